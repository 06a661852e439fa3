"""docs/API.md is the project's own contract: generated from the schema (cannot drift), every field has a
meaning, errors and the OpenAPI document point to it, and no document of the repository points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from api_compat import apidoc

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "API.md"


def test_generated_tables_match_the_schema():
    text = API_MD.read_text(encoding="utf-8")
    assert set(apidoc.block_names(text)) == set(apidoc.DOCUMENTED), "a generated block is missing from docs/API.md"
    assert apidoc.render(text) == text, "docs/API.md is out of date: run python -m api_compat.apidoc"


def test_every_schema_field_has_a_meaning_and_a_row():
    assert apidoc.undocumented() == [], "add the meaning of these fields to api_compat/apidoc.py FIELD_DOCS"
    text = API_MD.read_text(encoding="utf-8")
    for block, model in apidoc.documented_models().items():
        section = text.split(f"<!-- generated:{block} -->")[1].split(f"<!-- /generated:{block} -->")[0]
        props = model.model_json_schema()["properties"]
        for name in model.model_fields:
            row = next((line for line in section.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{model.__name__}.{name} has no row in docs/API.md"
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert cells[4], f"{model.__name__}.{name}: empty meaning"
            if "default" in props[name]:  # the default shown is the schema's
                assert cells[2] == apidoc.json.dumps(props[name]["default"])


def test_a_changed_schema_changes_the_page():
    """The generator reads the schema: a changed range shows up (so a stale page fails the test above)."""
    from pydantic import Field, create_model

    model = create_model("Demo", steps=(int, Field(20, json_schema_extra={"minimum": 1, "maximum": 99})))
    apidoc.FIELD_DOCS.setdefault("steps", "sampling steps")
    table = apidoc.field_table(model)
    assert "| `steps` | int | 20 | 1..99 |" in table


def test_unknown_field_error_points_to_the_page():
    from api_compat.errors import ApiError
    from api_compat.schema import parse_payload

    with pytest.raises(ApiError) as err:
        parse_payload({"promt": "a cat"}, strict=True)
    assert err.value.code == "unknown_field" and "docs/API.md" in err.value.allowed
    assert "'prompt'" in err.value.message  # the "did you mean"


def test_openapi_descriptions_point_to_the_page(tmp_path):
    pytest.importorskip("fastapi")
    from api_compat.http import create_app
    from api_compat.service import TaskService

    from fastapi.testclient import TestClient

    with TaskService(tmp_path / "models", results_dir=tmp_path / "out", check_models=False) as service:
        with TestClient(create_app(service), base_url="http://localhost") as client:
            spec = client.get("/openapi.json").json()
    assert "docs/API.md" in spec["info"]["description"]
    schemas = spec["components"]["schemas"]
    assert "docs/API.md" in schemas["Txt2ImgPayload"]["description"]
    steps = schemas["Txt2ImgPayload"]["properties"]["steps"]["description"]
    assert steps.startswith(apidoc.FIELD_DOCS["steps"]) and "1 to 150" in steps
    assert schemas["ControlNetUnitPayload"]["properties"]["processor_res"]["description"].startswith("preprocessor")


# ------------------------------------------------------------------------------ no link leaves the repository
_OUTSIDE = re.compile(r"/work/|\bshared/spec\b|\.\./shared\b|\.\./seeds\b")
_RELATIVE = re.compile(r"(?<![\w.])((?:\.\./)+[\w.\-/]+)")
_MD_LINK = re.compile(r"\]\(([^)#\s]+)")


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / line for line in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file
        files = [p for pat in patterns for p in ROOT.rglob(pat.replace("**/", ""))]
    return [p for p in files if p.is_file() and ".venv" not in p.parts]


def _leaks(path: Path, text: str) -> list[str]:
    found = [m[0] for m in _OUTSIDE.finditer(text)]
    if path.suffix == ".md":
        targets = [m[1] for m in _RELATIVE.finditer(text)] + [m[1] for m in _MD_LINK.finditer(text)]
        for target in targets:
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT):
                found.append(target)
    return found


def test_no_document_points_outside_the_repository():
    leaks = {}
    for path in _tracked("*.md", "**/*.md", "*.py", "**/*.py", "Makefile", "*.toml", ".ci/run"):
        if path.resolve() == Path(__file__).resolve():
            continue
        found = _leaks(path, path.read_text(encoding="utf-8", errors="replace"))
        if found:
            leaks[str(path.relative_to(ROOT))] = found
    assert leaks == {}


def test_the_link_check_finds_links_out(tmp_path):
    doc = ROOT / "docs" / "example.md"  # not written: only its location matters
    assert _leaks(doc, "see `../shared/spec/API.md`")
    assert _leaks(doc, "see [the spec](../../elsewhere/API.md)")
    assert _leaks(doc, "a probe in /work/shared/GPU.md")
    assert not _leaks(doc, "see [the API](API.md), [decisions](../docs/DECISIONS.md), https://example.com/../x")
