"""Security properties that hold across the package: no load path unpickles, and specs never
crash `visionray validate` whatever YAML they hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from visionray.cli import app
from tests.helpers import REPO

runner = CliRunner()


def test_loading_a_checkpoint_never_unpickles(tmp_path):
    """Python raises the audit event ``pickle.find_class`` whenever unpickling resolves a global:
    a fresh interpreter saves a checkpoint, then loads and evaluates it with a hook counting them."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from visionray import checkpoint as ckpt
        from visionray.models import create_model
        from visionray.specs import TrainSpec
        spec = TrainSpec.model_validate({{"model": {{"depth": 1, "width": 4}}}})
        d = Path({str(tmp_path)!r})
        ckpt.save_checkpoint(d, create_model("convnet", 10, 1, 32, depth=1, width=4), spec=spec,
                             classes=[str(i) for i in range(10)], preset=spec.eval_preset(1), metrics={{}}, epoch=1,
                             train_state={{"epoch": 1}})
        events = []
        sys.addaudithook(lambda name, args: events.append(args) if name == "pickle.find_class" else None)
        model, meta = ckpt.load_model(d)
        state = ckpt.load_train_state(d)
        from visionray.evaluate import predict_logits
        import torch
        predict_logits(model, meta, torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
        print("UNPICKLED", len(events), events[:3])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "UNPICKLED 0 []" in out.stdout, out.stdout


def test_no_pickle_or_torch_load_in_the_package():
    offenders = []
    for path in (REPO / "platform" / "visionray").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
sections = st.sampled_from(["data", "augment", "model", "optim", "scaling", "checkpoint", "output", "register", "seed", "evaluation", "junk"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(sections, yaml_values, max_size=5) | yaml_values, raw=st.binary(max_size=64))
def test_validate_never_prints_a_traceback(tmp_path, spec, raw):
    for content in (yaml.safe_dump(spec).encode(), raw):
        path = tmp_path / "fuzz.yaml"
        path.write_bytes(content)
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code in (0, 2), (content, result.output, result.exception)
        assert "Traceback" not in result.output


LOAD_PATHS = textwrap.dedent("""
    import asyncio, os, pickle, sys
    from pathlib import Path
    import httpx, torch
    from visionray import checkpoint as ckpt
    from visionray.evaluate import evaluate_checkpoint
    from visionray.models import create_model
    from visionray.serve.api import LocalBackend, make_api
    from visionray.serve.config import load_serve_spec
    from visionray.serve.predictor import Predictor
    from visionray.specs import DataSpec, TrainSpec
    from visionray.registry.keys import generate_keys
    from visionray.registry.registry import Registry
    from visionray.tune.run import SearchError, run_search
    from visionray.tune.spec import experiment_dir, load_search_spec

    tmp = Path(sys.argv[1])
    os.environ["VISIONRAY_STATE_KEY_FILE"] = str(tmp / "state.key")
    spec = TrainSpec.model_validate({"data": {"source": "digits", "image_size": 8}, "model": {"depth": 1, "width": 4}})
    ckpt.save_checkpoint(tmp / "ckpt", create_model("convnet", 10, 1, 8, depth=1, width=4), spec=spec,
                         classes=[str(i) for i in range(10)], preset=spec.eval_preset(1), metrics={}, epoch=1)
    private, public = generate_keys(tmp / "signer")
    registry = Registry(str(tmp / "registry"))
    registry.register(tmp / "ckpt", "digits", alias="best", private_key=private)
    search = load_search_spec(Path(sys.argv[2]), [f"output.storage={tmp / 'runs'}", "output.name=crafted"])
    exp = Path(experiment_dir(search))
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps(__import__("collections").OrderedDict(crafted=True)))  # loading it resolves a global

    events = []
    sys.addaudithook(lambda name, args: events.append((name, args)) if name == "pickle.find_class" else None)
    model, meta = registry.load("digits@best", [public])                      # registry load
    evaluate_checkpoint(model, meta, "val")                                   # evaluate (digits val split)
    app = make_api(load_serve_spec({"checkpoint": str(tmp / "ckpt"), "allow_unsigned": True}),
                   LocalBackend(Predictor(model, meta, "digits", 1, torch.device("cpu"))))
    from PIL import Image
    import io
    buf = io.BytesIO(); Image.new("L", (8, 8), 9).save(buf, "PNG")

    async def classify():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vr") as c:
            return await c.post("/v1/classify", content=buf.getvalue(), headers={"content-type": "image/png"})

    assert asyncio.run(classify()).status_code == 200                         # serve: sanitizer, decoders, model
    try:
        run_search(search, resume=True)                                 # tune resume of a crafted state
    except SearchError as exc:
        assert "not resuming" in str(exc)
    else:
        raise AssertionError("resumed a crafted search")
    print("UNPICKLED", len(events), events[:3])
""")


def test_no_load_path_unpickles(tmp_path):
    """The audit event ``pickle.find_class`` fires whenever unpickling resolves a global: registry
    load, evaluate, a served request and a refused tune resume raise none."""
    out = subprocess.run([sys.executable, "-c", LOAD_PATHS, str(tmp_path), str(REPO / "tune" / "quickstart.yaml")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "UNPICKLED 0 []" in out.stdout, out.stdout


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS + "data: *i\n")
    assert len(path.read_bytes()) < 600
    t0 = time.perf_counter()
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and time.perf_counter() - t0 < 5
    assert "YAML alias" in result.output and "Traceback" not in result.output


def test_error_messages_cut_long_values(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("output:\n  name: '" + "x" * 100_000 + "'\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "output.name" in result.output
    assert len(result.output) < 5_000 and "100002 characters" in result.output
