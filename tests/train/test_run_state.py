"""A damaged ``state.pt`` is refused on resume with one line naming the file and the field: seeded
mutations of every field of a real run's state, and real resumes through the command line."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from densenet_zoo import RunError, ZooError
from densenet_zoo.cli import main
from densenet_zoo.train import finetune, run_files
from _train_helpers import base_options, digits_subset

pytestmark = pytest.mark.usefixtures("one_thread")

HOSTILE = [-1, -10 ** 9, 10 ** 12, 1.5, float("nan"), float("inf"), True, None, "", "3", [], {}, [1, 2], {"a": 1},
           torch.zeros(3), torch.tensor(float("nan")), b"\x00"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    data = digits_subset(root / "digits", classes=2, train_per_class=4, val_per_class=2)
    finetune(**base_options(data, root / "run", epochs=1, batch_size=4))
    return root / "run"


def _mutations(state: dict, rng: random.Random, n: int):
    """``n`` seeded damages: a field gets a hostile value, loses an entry, or contradicts another field."""
    fields = sorted(k for k in state if k != "format")
    for _ in range(n):
        s = copy.deepcopy(state)
        field = rng.choice(fields)
        kind = rng.random()
        if kind < 0.6:
            s[field] = rng.choice(HOSTILE)
        elif kind < 0.8 and isinstance(s[field], (list, dict)) and s[field]:
            container = s[field]
            if isinstance(container, list):
                container.pop(rng.randrange(len(container)))
            else:
                container.pop(rng.choice(sorted(container, key=str)))
        else:
            field = rng.choice(["epoch", "best_epoch", "bad_epochs", "global_step"])
            s[field] = s[field] + rng.randint(1, 5)
        yield field, s


def test_every_damaged_field_is_refused_by_name_or_harmless(run, tmp_path):
    state = torch.load(run / "state.pt", weights_only=True)
    refused, accepted = {}, []
    for i, (field, damaged) in enumerate(_mutations(state, random.Random(0), 300)):
        path = tmp_path / f"state{i}.pt"
        run_files.save_run_state(damaged, path)
        try:
            run_files.load_run_state(path)
            accepted.append((field, path))
        except RunError as exc:
            text = str(exc)
            assert "\n" not in text and str(path) in text and "field '" in text, text
            named = text.split("field '", 1)[1].split("'", 1)[0]
            refused[named] = refused.get(named, 0) + 1
    # Every field that a run reads was refused at least once, each by its own name.
    assert set(refused) >= {"class_names", "model", "optimizer", "rng", "epoch", "batches_done", "global_step",
                            "partial", "history", "best_acc1", "best_epoch", "bad_epochs", "config", "scheduler"}, refused
    # What passed has values a run could have saved (a later step count, one class fewer...): resuming from
    # such a state trains on or stops with one of the package's one-line errors, never an unexpected one.
    assert 0 < len(accepted) < 150
    for i, (field, path) in enumerate(random.Random(1).sample(accepted, min(4, len(accepted)))):
        folder = tmp_path / f"resume{i}"
        folder.mkdir()
        for f in run.iterdir():
            if f.is_file() and f.name != "state.pt":
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "state.pt").write_bytes(path.read_bytes())
        try:
            finetune(resume=str(folder), epochs=2, progress=False)
        except Exception as exc:  # noqa: BLE001 - which kind is the point
            assert isinstance(exc, ZooError) and "\n" not in str(exc), (field, repr(exc))


@pytest.mark.parametrize("field, value, says", [
    ("epoch", -3, "field 'epoch' is negative"),
    ("partial", [0.0, 0.0, 0.0, 0.0], "field 'partial' is not 4 floating-point sums"),
    ("rng", [], "field 'rng' is not a non-empty list"),
    ("best_acc1", 250.0, "field 'best_acc1' is 250.0, outside 0..100"),
])
def test_resume_from_a_damaged_state_is_one_line(run, tmp_path, field, value, says, capsys):
    damaged = tmp_path / "run"
    damaged.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (damaged / f.name).write_bytes(f.read_bytes())
    state = torch.load(damaged / "state.pt", weights_only=True)
    state[field] = value
    run_files.save_run_state(state, damaged / "state.pt")
    assert main(["finetune", "--resume", str(damaged), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and str(damaged / "state.pt") in lines[0], err
    assert torch.load(damaged / "state.pt", weights_only=True)[field] == value or field == "partial"  # untouched
