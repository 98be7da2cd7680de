"""Issue 15: every `moerail` subcommand given bad input ends with one line naming the flag or
file at fault and a non-zero exit, never a traceback (a table of well over 100 invocations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moerail import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    f = {}

    def put(name, data: bytes):
        p = d / name
        p.write_bytes(data)
        f[name] = str(p)

    put("empty.npy", b"")
    put("corrupt.npy", b"\x93NUMPY garbage that is not an array")
    put("empty.csv", b"")
    put("header_only.csv", b"step,layer,expert,tokens\n")
    put("neg_expert.csv", b"step,layer,expert,tokens\n0,0,-1,5\n0,0,1,3\n")
    put("neg_layer.csv", b"step,layer,expert,tokens\n0,-2,0,5\n")
    put("frac_id.csv", b"step,layer,expert,tokens\n0,0,0.5,5\n")
    put("huge_id.csv", b"step,layer,expert,tokens\n0,0,99999999999,5\n")
    put("text.csv", b"a,b\nc,d\n")
    put("ragged.csv", b"1,2,3\n4,5\n")
    put("empty.json", b"")
    put("bad.json", b"{not json")
    put("strings.json", b'["a", "b"]')
    put("emptylist.json", b"[]")
    put("nested_empty.json", b"[[]]")
    put("dict.json", b'{"foo": 1}')
    put("steps_bad.json", b'{"steps": [{"nope": 1}]}')
    put("corrupt.pt", b"PK\x03\x04 not a zip")
    put("loads.txt", b"1 2 3")
    put("noext", b"1,2")
    put("config_list.json", b"[1, 2, 3]")
    put("config_str.json", b'"hello"')
    put("config_bad.json", b"{")
    put("config_bad.toml", b"model = [")
    put("config_unknown.json", b'{"nonsense": {}}')
    put("config.yaml", b"model: x")
    put("config_badutf8.json", b"\xff\xfe\x00")
    for name, arr in {
        "complex.npy": np.array([[1 + 2j, 3 + 0j]]),
        "strings.npy": np.array([["a", "b"]]),
        "zero_experts.npy": np.zeros((2, 0)),
        "zero_layers.npy": np.zeros((0, 4)),
        "nan.npy": np.array([[1.0, float("nan"), 2.0, 3.0]]),
        "negative.npy": np.array([[1.0, -5.0, 2.0, 3.0]]),
        "inf.npy": np.array([[1.0, float("inf"), 2.0, 3.0]]),
        "four_d.npy": np.ones((1, 1, 2, 4)),
        "object.npy": np.array([{"a": 1}], dtype=object),
        "good.npy": np.array([[5.0, 1.0, 2.0, 8.0], [3.0, 3.0, 1.0, 1.0]]),
    }.items():
        p = d / name
        np.save(p, arr, allow_pickle=True)
        f[name] = str(p)
    p = d / "notensor.pt"
    torch.save({"x": 1}, p)
    f["notensor.pt"] = str(p)
    p = d / "current_bad.pt"
    torch.save({"phy2log": torch.tensor([[9, 9, 9, 9]])}, p)
    f["current_bad.pt"] = str(p)
    p = d / "current_shape.npy"
    np.save(p, np.array([[0, 1]]))
    f["current_shape.npy"] = str(p)
    f["dir"] = str(d)
    f["missing"] = str(d / "missing.npy")
    f["missing_dir_save"] = str(d / "no" / "such" / "out.pt")
    f["missing_dir_plot"] = str(d / "no" / "such" / "out.png")
    (d / "config.json").write_text(json.dumps({"model": "no-such-model"}))
    f["config_unknown_preset.json"] = str(d / "config.json")
    return f


# (argv with {file} placeholders, a text the error line must contain)
BAD_LOADS = ["empty.npy", "corrupt.npy", "empty.csv", "header_only.csv", "neg_expert.csv", "neg_layer.csv",
             "frac_id.csv", "huge_id.csv", "text.csv", "ragged.csv", "empty.json", "bad.json", "strings.json",
             "emptylist.json", "nested_empty.json", "dict.json", "steps_bad.json", "corrupt.pt", "loads.txt", "noext",
             "complex.npy", "strings.npy", "zero_experts.npy", "zero_layers.npy", "nan.npy", "negative.npy",
             "inf.npy", "four_d.npy", "object.npy", "notensor.pt", "dir", "missing"]

CASES = []
for name in BAD_LOADS:
    CASES.append((["balance", "--loads", "{" + name + "}", "--gpus", "2"], "loads"))
for flag in ["--gpus", "--nodes", "--slots", "--num-redundant-experts", "--groups", "--max-moves"]:
    for v in ["0", "-1", "x", "1.5", "99999999999999999999999"]:
        extra = [] if flag == "--gpus" else ["--gpus", "2"]
        want = {"--gpus": "expert-model-parallel-size", "--num-redundant-experts": "redundant"}.get(flag, flag.lstrip("-"))
        if flag in ("--gpus", "--nodes", "--slots", "--groups", "--max-moves") and v in ("x", "1.5"):
            want = flag
        if flag == "--num-redundant-experts" and v in ("x", "1.5"):
            want = flag
        if flag in ("--num-redundant-experts", "--max-moves") and v == "0":
            want = None  # valid
        CASES.append((["balance", "--loads", "{good.npy}", *extra, flag, v], want))
for flag in ["--capacity", "--expert-bytes", "--seconds-per-token", "--horizon"]:
    for v in ["-1", "nan", "inf", "abc", "0"]:
        CASES.append((["balance", "--loads", "{good.npy}", "--gpus", "2", flag, v,
                       *(["--expert-bytes", "1e6"] if flag in ("--seconds-per-token", "--horizon") else [])], None))
CASES += [
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--mode", "bogus"], "--mode"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--use", "bogus"], "--use"),
    (["balance", "--loads", "{good.npy}", "--gpus", "3"], "slots"),
    (["balance", "--loads", "{good.npy}", "--gpus", "4", "--nodes", "3"], "--nodes"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{missing}"], "--current"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{corrupt.pt}"], "--current"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{current_bad.pt}"], None),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{current_shape.npy}"], None),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{empty.csv}"], "--current"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--current", "{dir}"], "--current"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--save", "{missing_dir_save}"], "--save"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--save", "{dir}"], "--save"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--plot", "{missing_dir_plot}"], "--plot"),
    (["balance", "--gpus", "2"], "--loads"),
    (["balance", "--loads", "{good.npy}"], "--expert-model-parallel-size"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--bogus-flag"], "--bogus-flag"),
    (["balance", "--loads", "{good.npy}", "--gpus", "2", "--slots", "6", "--num-redundant-experts", "2"], "--slots"),
    (["balance", "--loads"], "--loads"),
]
for flag in ["--devices", "--gbs", "--seq", "--mbs", "--top", "--tp", "--pp", "--ep"]:
    for v in ["0", "-4", "abc"]:
        CASES.append((["plan", "--model", "Mixtral-8x7B", "--cluster", "H100-NVL8-IB400", "--devices", "64",
                       flag, v], None))
CASES += [
    (["plan", "--config", "{config_list.json}"], "config"),
    (["plan", "--config", "{config_str.json}"], "config"),
    (["plan", "--config", "{config_bad.json}"], "config"),
    (["plan", "--config", "{config_bad.toml}"], "config"),
    (["plan", "--config", "{config_unknown.json}"], "nonsense"),
    (["plan", "--config", "{config.yaml}"], "config"),
    (["plan", "--config", "{config_badutf8.json}"], "config"),
    (["plan", "--config", "{dir}"], "config"),
    (["plan", "--config", "{missing}"], "config"),
    (["plan", "--config", "{config_unknown_preset.json}"], "model"),
    (["plan", "--model", "no-such-model"], "model"),
    (["plan", "--cluster", "no-such-cluster"], "cluster"),
    (["plan", "--model", ""], "model"),
    (["plan", "--megatron-args", ""], "--megatron-args"),
    (["plan", "--megatron-args", "'unbalanced"], "--megatron-args"),
    (["plan", "--megatron-args", "--num-layers abc"], None),
    (["plan", "--megatron-args", "--num-layers -3 --hidden-size 0"], None),
    (["plan", "--set", "novalue"], "--set"),
    (["plan", "--set", "model.nonsense_key=3", "--model", "Mixtral-8x7B"], None),
    (["plan", "--set", "bogus.section=3"], "bogus"),
    (["plan", "--bogus"], "--bogus"),
    (["plan", "--devices"], "--devices"),
    (["doctor", "--compile", "not-an-arch", "--no-probe"], None),
    (["doctor", "--bogus"], "--bogus"),
    (["bogus-command"], "bogus-command"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 100, len(CASES)
    assert {c[0][0] for c in CASES} >= {"balance", "plan", "doctor"}


@pytest.mark.parametrize("argv,want", CASES, ids=[" ".join(c[0])[:80] for c in CASES])
def test_bad_invocation_is_one_clean_line(files, capsys, argv, want):
    argv = [files[a[1:-1]] if a.startswith("{") and a.endswith("}") else a for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    if code == 0 and want is None:
        return  # a value that is fine after all (e.g. --capacity 0 or a plan that runs)
    assert code not in (0, None), f"exit 0 for {argv}: {out[-500:]}{err[-500:]}"
    assert "Traceback" not in err and "Traceback" not in out, err
    line = err.strip().splitlines()[-1] if err.strip() else ""
    assert line, f"no error line for {argv}"
    assert "error" in line, line
    if want is not None:
        assert want in line, f"{want!r} not in {line!r}"
