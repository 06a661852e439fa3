from engine.infotext import create_infotext, parse_infotext, quote


def test_webui_format_matches_spec_example():
    text = create_infotext("a cat", "ugly", {
        "Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1,
        "Size": "512x512", "Model hash": "abcdef1234", "Model": "m", "Clip skip": 2, "ENSD": None,
    })
    assert text == ("a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, "
                    "CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: m, Clip skip: 2")


def test_no_negative_line_when_empty_and_quoting():
    text = create_infotext("x", "", {"Steps": 2, "Lora hashes": "a: 1, b: 2", "CFG scale": 7.5})
    assert text == 'x\nSteps: 2, Lora hashes: "a: 1, b: 2", CFG scale: 7.5'
    assert quote('say "hi"') == '"say \\"hi\\""'


def test_round_trip():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "ControlNet 0": "Module: canny, Weight: 1", "Seed": 5}
    prompt, neg, parsed = parse_infotext(create_infotext("a\nb", "c", params))
    assert (prompt, neg) == ("a\nb", "c")
    assert parsed == {k: str(v) for k, v in params.items()}
