"""Security properties that hold across the package: no load path unpickles, and specs never
crash `visionray validate` whatever YAML they hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from visionray.cli import app

REPO = Path(__file__).resolve().parents[1]
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
        spec = TrainSpec()
        d = Path({str(tmp_path)!r})
        ckpt.save_checkpoint(d, create_model("convnet", 10, 1, 32, depth=1, width=4), spec=spec, model_name="convnet",
                             model_kwargs={{"depth": 1, "width": 4}}, classes=[str(i) for i in range(10)],
                             preset=spec.eval_preset(1), metrics={{}}, epoch=1, train_state={{"epoch": 1}})
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
