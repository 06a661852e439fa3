"""The engine's middle, tested through ``Engine`` (not through its parts): what the sampling loop runs is what
each room says it runs.

- For every sampler name, the latents the engine decodes equal (bit for bit) a direct call of
  ``SAMPLERS[name]`` and ``resolve(name).sample`` over a denoiser, conditioning and noise built in the test from
  the public parts (same backend, same seeds).
- LCM through the engine matches the webui's sample_lcm (modules/sd_samplers_lcm.py, transcribed in
  tests/test_samplers_reference.py) over an LCM denoiser written here from the webui's rules (50 LCM
  timesteps, quantized timesteps, boundary-condition scalings): within 1e-6 relative (fp32).
- SDXL + "Align Your Steps" samples on the SDXL table; infotext Eta / ENSD follow the webui rule.
- ``sdengine export`` with an external VAE writes the artefacts the engine then finds (no export at generation).
- The layering of docs/ARCHITECTURE.md (MAY_IMPORT): core/ at the bottom, export/ on core only, engine/, api_compat/
  (not export/), benchmarks/ and training/, cli/ on top (nothing imports it); string-named imports count; no cycles.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from engine.conditioning import TextModelInfo, encode_request
from engine.denoiser import Denoiser
from engine.infotext import parse_infotext
from engine.models.family import FAMILIES, Arch
from engine.noise import ImageRNG
from engine.pipeline import Engine
from engine.request import GenerationRequest
from engine.samplers import SAMPLERS, SPECS, resolve
from engine.schedule import ModelSchedule
from tests.test_samplers_reference import webui_lcm

PROMPT, NEGATIVE, SEED, STEPS = "a red [circle:square:0.5]", "blue", 21, 4


@pytest.fixture(scope="module")
def engine(tiny_store, tmp_path_factory):
    return Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path_factory.mktemp("artefacts"))


def _generate_capturing_latents(engine, req):
    """Runs the engine and returns (result, the latents it handed to the VAE decoder)."""
    rt = engine.runtime(req.model)
    seen = []
    original = rt.backend.run

    def run(component, feeds):
        if component == "vae_decoder":
            seen.append(np.array(feeds["latent"], copy=True))
        return original(component, feeds)

    rt.backend.run = run
    try:
        result = engine.generate(req)
    finally:
        del rt.backend.run
    return result, np.concatenate(seen)


def _unet(rt):
    def model(x_in, t_in, cond, step):
        feeds = {"sample": x_in, "timestep": t_in, "encoder_hidden_states": cond.context[: x_in.shape[0]]}
        if cond.pooled is not None:
            feeds["text_embeds"] = cond.pooled[: x_in.shape[0]]
            feeds["time_ids"] = cond.time_ids[: x_in.shape[0]]
        return rt.backend.run("unet", feeds)["model_output"]
    return model


def _direct(engine, model_name, arch, sampler_name, scheduler="Automatic", cfg=5.0, eta=None, ensd=0):
    """The latents of one image, sampled without the engine: parts assembled here from the rooms' public API."""
    rt = engine.runtime(model_name)
    model = rt.model
    schedule = ModelSchedule.from_config(model.scheduler_config, sdxl=arch is Arch.SDXL)
    r = resolve(sampler_name, scheduler)
    sigmas = r.sigmas(STEPS, schedule).astype(np.float32)
    size = model.native_size
    cond = encode_request(rt.backend, TextModelInfo(FAMILIES[arch].text, model.sha256), [PROMPT], [NEGATIVE],
                          steps=STEPS, width=size, height=size)
    denoiser = Denoiser(_unet(rt), r.model_schedule(schedule), model.prediction_type, cfg, cond.at, sigmas)
    rng = ImageRNG((4, size // 8, size // 8), [SEED], [0], 0.0, eta_noise_seed_delta=ensd if r.uses_ensd else 0)
    x = rng.first().numpy() * sigmas[0]
    noise = r.noise_sampler(x, rng, [SEED], sigmas)
    return r, denoiser, x, sigmas, noise, rng


@pytest.mark.parametrize("name", list(SPECS))
def test_engine_runs_the_named_sampler(engine, name):
    req = GenerationRequest(model="tiny-sd1", prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=SEED,
                            subseed=0, cfg_scale=5.0, sampler_name=name, eta_noise_seed_delta=7)
    _, latents = _generate_capturing_latents(engine, req)
    r, denoiser, x, sigmas, noise, _ = _direct(engine, "tiny-sd1", Arch.SD1, name, ensd=7)
    via_mapping = SAMPLERS[name](denoiser, x, sigmas, noise=noise)
    assert np.array_equal(latents, via_mapping), f"{name}: engine latents != SAMPLERS[{name!r}]"
    _, denoiser, x, sigmas, noise, _ = _direct(engine, "tiny-sd1", Arch.SD1, name, ensd=7)
    via_resolved = r.sample(denoiser, x, sigmas, noise=noise)
    assert np.array_equal(latents, via_resolved)


def test_samplers_mapping_binds_the_webui_options():
    """SAMPLERS[name] is the function the engine runs: DPM++ 2M SDE Heun is the Heun variant, not the midpoint."""
    sigmas = np.array([10.0, 5.0, 2.0, 1.0, 0.0], dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)

    def denoise(v, s):
        return v * 0.8 / (1 + float(s))

    def noise(a, b):
        return np.full_like(x, 0.1)

    heun = SAMPLERS["DPM++ 2M SDE Heun"](denoise, x.copy(), sigmas, noise=noise)
    midpoint = SAMPLERS["DPM++ 2M SDE"](denoise, x.copy(), sigmas, noise=noise)
    raw_heun = SPECS["DPM++ 2M SDE"].fn(denoise, x.copy(), sigmas, noise=noise, eta=1.0, solver_type="heun")
    assert not np.allclose(heun, midpoint)
    assert np.array_equal(heun, raw_heun)


def _lcm_reference_denoiser(rt, cond_at):
    """The webui's LCMCompVisDenoiser, written from its rules: 50 timesteps 19, 39, ..., 999; a sigma maps to
    the nearest of them; x0 = x - sigma * eps, then LCM's boundary condition on timestep * 10."""
    model = rt.model
    ac = torch.from_numpy(np.asarray(model.alphas_cumprod, dtype=np.float32))
    timesteps = torch.arange(19, 1000, 20)
    lcm_sigmas = ((1 - ac[timesteps]) / ac[timesteps]) ** 0.5

    def denoise(x, sigma):
        sigma = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        idx = int(torch.argmin((lcm_sigmas.log() - math.log(sigma)).abs()))
        t = float(timesteps[idx])
        cond = cond_at(0)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        eps = torch.from_numpy(np.asarray(rt.backend.run("unet", {
            "sample": (x * c_in).numpy(), "timestep": np.array([t], np.float32),
            "encoder_hidden_states": np.asarray(cond.context[:1])})["model_output"]))
        x0 = x - sigma * eps
        scaled = t * 10
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        return x0 * c_out + x * c_skip

    return denoise, lcm_sigmas


def test_lcm_through_the_engine_is_lcm(engine):
    req = GenerationRequest(model="tiny-sd1", prompt="a red circle", steps=STEPS, seed=SEED, subseed=0,
                            cfg_scale=1.0, sampler_name="LCM")
    _, latents = _generate_capturing_latents(engine, req)
    rt = engine.runtime("tiny-sd1")
    cond = encode_request(rt.backend, TextModelInfo(FAMILIES[Arch.SD1].text, rt.model.sha256), ["a red circle"],
                          [""], steps=STEPS)
    denoise, lcm_sigmas = _lcm_reference_denoiser(rt, cond.at)
    # the webui's LCM sigmas: k-diffusion DiscreteSchedule.get_sigmas(n) over the LCM denoiser's 50 sigmas
    t = np.linspace(len(lcm_sigmas) - 1, 0, STEPS)
    log_s = np.log(lcm_sigmas.numpy().astype(np.float64))
    sigmas = torch.tensor(np.append(np.exp(np.interp(t, np.arange(len(log_s)), log_s)), 0.0), dtype=torch.float32)
    rng = ImageRNG((4, 8, 8), [SEED], [0], 0.0)
    x = rng.first() * sigmas[0]
    ref = webui_lcm(denoise, x, sigmas, noise=lambda a, b: rng.next())
    # fp32: 1e-6 relative to the latents' scale (|x| reaches ~25); the plain (non-LCM) schedule is off by ~1
    assert np.abs(latents - ref.numpy()).max() <= 1e-6 * max(1.0, float(ref.abs().max()))


def test_sdxl_align_your_steps_uses_the_sdxl_table(engine):
    rt = engine.runtime("tiny-sdxl")
    family = rt.model.family
    assert family.schedule.sdxl and not engine.runtime("tiny-sd1").model.family.schedule.sdxl
    plan = resolve("Euler", "Align Your Steps").prepare(10, family)
    sdxl = resolve("Euler", "Align Your Steps").sigmas(10, ModelSchedule.scaled_linear(sdxl=True))
    sd1 = resolve("Euler", "Align Your Steps").sigmas(10, ModelSchedule.scaled_linear(sdxl=False))
    assert np.array_equal(plan.sigmas, sdxl) and not np.allclose(sdxl, sd1)
    # and the engine samples on them: the decoded latents equal a direct run on the SDXL sigmas
    req = GenerationRequest(model="tiny-sdxl", prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=SEED,
                            subseed=0, cfg_scale=5.0, sampler_name="Euler", scheduler="Align Your Steps")
    _, latents = _generate_capturing_latents(engine, req)
    r, denoiser, x, sigmas, noise, _ = _direct(engine, "tiny-sdxl", Arch.SDXL, "Euler", "Align Your Steps")
    assert np.array_equal(latents, r.sample(denoiser, x, sigmas, noise=noise))


@pytest.mark.parametrize("sampler, eta, ensd, expected", [
    ("Euler a", None, 31337, {"ENSD": "31337"}),              # uses ENSD; eta at its default: no Eta
    ("Euler a", 0.5, 0, {"Eta": "0.5"}),
    ("Euler a", 1.0, 0, {}),                                   # the default eta is not written
    ("Euler", 0.3, 31337, {}),                                 # Euler takes no eta and no ENSD
    ("DDIM", 0.3, 0, {"Eta DDIM": "0.3"}),
    ("DPM++ 2M SDE", None, 31337, {}),                         # Brownian noise: ENSD unused
])
def test_infotext_eta_and_ensd_follow_the_webui_rule(engine, sampler, eta, ensd, expected):
    req = GenerationRequest(model="tiny-sd1", prompt="x", steps=2, seed=1, sampler_name=sampler, eta=eta,
                            eta_noise_seed_delta=ensd)
    _, _, params = parse_infotext(engine.generate(req).infotexts[0])
    got = {k: v for k, v in params.items() if k in ("Eta", "Eta DDIM", "ENSD")}
    assert got == expected


def test_controlnet_fit_is_decided_by_the_family(engine):
    from core.errors import InvalidRequest

    sd2 = engine.runtime("tiny-sd2v").model.family
    sd1 = engine.runtime("tiny-sd1").model.family
    assert sd1.fits_controlnet(Arch.CONTROLNET_SD1) and not sd1.fits_controlnet(Arch.CONTROLNET_SDXL)
    assert not sd2.fits_controlnet(Arch.CONTROLNET_SD1)  # 1024-wide context: SD1.5 ControlNets do not fit

    class CN:
        name, arch = "cn", Arch.CONTROLNET_SD1

    with pytest.raises(InvalidRequest) as err:
        sd2.check_controlnet(CN, "tiny-sd2v", "alwayson_scripts.controlnet.units[0].model")
    assert err.value.field == "alwayson_scripts.controlnet.units[0].model"


def test_export_with_external_vae_is_found_by_the_engine(tiny_store, tmp_path):
    """`sdengine export MODEL --vae` and a generation with that VAE share the artefact key: no export happens."""
    import shutil

    from click.testing import CliRunner

    from cli import main
    import export.onnx as onnx_export

    store = tmp_path / "models"
    (store / "Stable-diffusion").mkdir(parents=True)
    (store / "VAE").mkdir()
    shutil.copy(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors", store / "Stable-diffusion")
    from engine.models.convert import save_single_file
    from engine.models.tiny import build_vae

    save_single_file({"vae": build_vae(seed=5)}, store / "VAE" / "alt.safetensors")
    cache = tmp_path / "cache"
    res = CliRunner().invoke(main, ["export", "tiny-sd1", "--vae", "alt", "--models-dir", str(store),
                                    "--cache-dir", str(cache), "--backend", "onnxruntime"])  # what txt2img loads
    assert res.exit_code == 0, res.output

    exported = []
    original = onnx_export.torch_export
    onnx_export.torch_export = lambda *a, **k: exported.append(a) or original(*a, **k)
    try:
        eng = Engine(models_dir=store, backend="onnxruntime", cache_dir=cache)
        result = eng.generate(GenerationRequest(model="tiny-sd1", vae="alt", prompt="x", steps=2, seed=1))
    finally:
        onnx_export.torch_export = original
    assert exported == [], "the engine exported again what `sdengine export` had written"
    assert "VAE: alt" in result.infotexts[0]
    key = eng.runtime("tiny-sd1", "alt").model.family.artefact_key
    assert key.startswith(eng.runtime("tiny-sd1", "alt").model.short_hash + "-vae")
    assert (cache / key).is_dir()


# ----------------------------------------------------------------------------------------------- layering

PACKAGES = ("core", "engine", "export", "api_compat", "benchmarks", "training", "cli")
_NAMED = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*(?::[\w.]+)?")  # "package.module" or "package.module:attr"


def _import_graph():
    """module -> the project modules it imports: import statements anywhere in the file (module top or inside a
    function), ``importlib.import_module("...")`` / ``__import__("...")`` literals and "package.module:attr"
    strings (lazily loaded commands, factories)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    mods = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path

    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    def named(node):
        """The module a string names as an import target, or None."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _NAMED.fullmatch(node.value):
            return node.value.partition(":")[0]
        return None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and node.args and named(node.args[0]) and (
                    getattr(node.func, "attr", None) == "import_module"
                    or getattr(node.func, "id", None) in ("import_module", "__import__")):
                targets = [named(node.args[0])]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value \
                    and named(node):
                module = named(node)
                targets = [module] if module in mods else []  # only a string naming a module exactly
            for t in targets:
                dep = owner(t)
                if dep and dep != name and not name.startswith(dep + "."):  # a package's own __init__ is fine
                    deps.add(dep)
        graph[name] = deps
    return graph


def test_string_named_imports_are_edges():
    """The lazily loaded CLI commands ("module:attr") are edges of the graph the rules below check."""
    graph = _import_graph()
    assert {"cli.generate", "cli.serve", "cli.models", "cli.export", "cli.bench", "cli.paths"} <= graph["cli"]


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


# what each layer may import (docs/ARCHITECTURE.md "Layers"); tests import anything, nothing imports tests or cli
MAY_IMPORT = {
    "core": {"core"},
    "export": {"core", "export"},
    "engine": {"core", "export", "engine"},
    "api_compat": {"core", "engine", "api_compat"},
    "benchmarks": {"core", "export", "engine", "api_compat", "training", "benchmarks"},  # the device suite: the evaluator
    "training": {"core", "export", "engine", "api_compat", "training"},
    "cli": set(PACKAGES),
}


def test_layers_depend_in_one_direction():
    graph = _import_graph()
    for name, deps in graph.items():
        top = name.split(".")[0]
        for dep in deps:
            assert dep.split(".")[0] in MAY_IMPORT[top], (name, dep)
            assert top == "cli" or not dep.startswith("cli"), (name, dep)  # the composition root: nobody imports it
            assert not dep.startswith("tests"), (name, dep)
