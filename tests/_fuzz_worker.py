"""Child process of tests/test_fuzz_loading.py: damage real small checkpoints, seeded, and load them.

Usage: python _fuzz_worker.py FOLDER SEED CASES ALLOW_MIB. Imports first, then caps the address space
at what the process uses plus ALLOW_MIB, so a loader that allocates without bound fails fast.
Prints one JSON object: the outcome counts and every unacceptable outcome.
"""

import json
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)
import densenet_zoo as dz  # noqa: E402
from densenet_zoo.train import run_files  # noqa: E402

SMALL = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, small_inputs=True, num_classes=5)
HOSTILE = [-1, 0, 1, 10 ** 12, 2 ** 63, 10 ** 400, "8", "", None, [], {}, [10 ** 6] * 2, 1.5, float("nan"), True,
           "../../etc/passwd", {"*": "bn"}, [2] * 100]


def seeds(folder: Path) -> dict:
    """Real checkpoints of a small model in every format the loaders read."""
    torch.manual_seed(0)
    model = dz.DenseNet(**SMALL).eval()
    sd = model.state_dict()
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()
              if not k.endswith("num_batches_tracked")}
    files = {"safetensors": dz.save_model(model, folder / "m.safetensors", class_names=list("abcde"))}
    torch.save(sd, folder / "zip.pth")
    torch.save(legacy, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, folder / "wrapped.pth")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer state a real run saves
    run_files.save_run_state({
        "format": run_files.STATE_FORMAT, "config": {"model": "custom", "epochs": 3}, "class_names": list("abcde"),
        "model": sd, "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 4}, "rng": [run_files.rng_state()],
        "epoch": 2, "batches_done": 1, "global_step": 5, "partial": torch.zeros(4, dtype=torch.float64),
        "history": [{"epoch": 1, "acc1": 0.5}, {"epoch": 2, "acc1": 0.5}],
        "best_acc1": 0.5, "best_epoch": 1, "bad_epochs": 0}, folder / "state.pt")
    files.update({n: folder / f"{n.split('.')[0]}.{'pt' if n == 'state' else 'pth'}" for n in ("zip", "legacy", "wrapped", "state")})
    return files


def _mutate_metadata(data: bytes, rng: random.Random) -> bytes:
    """Rewrite a safetensors header: our metadata or one tensor's dtype/shape/offsets gets a hostile value."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if rng.random() < 0.6:
        meta = json.loads(header["__metadata__"]["densenet_zoo"])
        args = meta["model_args"]
        key = rng.choice(sorted(args) + ["evil", "block_config", "num_classes"])
        if rng.random() < 0.15:
            args.pop(key, None)
        else:
            args[key] = rng.choice(HOSTILE)
        text = json.dumps(meta) if rng.random() < 0.85 else json.dumps(meta)[: rng.randrange(1, 40)]
        header["__metadata__"]["densenet_zoo"] = text
    else:
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(HOSTILE + ["F16", "I64", "BOOL", [0, 10 ** 9], [10 ** 10, 0]])
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n:]


def mutate(data: bytes, kind: str, rng: random.Random, fmt: str) -> bytes:
    if kind == "truncate":
        return data[: rng.randrange(0, len(data))]
    if kind == "bitflip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "splat":
        out = bytearray(data)
        i = rng.randrange(len(out))
        out[i:i + 16] = bytes(rng.randrange(256) for _ in range(16))
        return bytes(out[: len(data)])
    return _mutate_metadata(data, rng) if fmt == "safetensors" else mutate(data, "bitflip", rng, fmt)


def _check_model(model) -> None:
    """A load that succeeded must give a working DenseNet."""
    assert isinstance(model, dz.DenseNet), type(model)
    with torch.no_grad():
        model.eval()(torch.randn(1, model.in_chans, 32, 32))


def loaders(fmt: str, path: Path, folder: Path) -> dict:
    calls = {
        "load_weights": lambda: _check_model(_loaded(path)),
        "convert_checkpoint": lambda: _check_model(dz.load_model(dz.convert_checkpoint(path, folder / "out.safetensors"))[0]),
    }
    if fmt == "safetensors":
        calls["load_model"] = lambda: _check_model(dz.load_model(path)[0])
    if fmt == "state":
        calls["load_run_state"] = lambda: run_files.load_run_state(path)
    return calls


def _loaded(path: Path):
    model = dz.DenseNet(**SMALL)
    dz.load_weights(model, path)
    return model


def acceptable(name: str, exc: BaseException) -> bool:
    if isinstance(exc, dz.ZooError):
        return "\n" not in str(exc)
    return False


def main(folder: Path, seed: int, cases: int, allow_mib: int) -> dict:
    files = seeds(folder)
    originals = {fmt: p.read_bytes() for fmt, p in files.items()}
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (allow_mib << 20), resource.RLIM_INFINITY))
    rng = random.Random(seed)
    counts, bad, slowest, start = Counter(), [], 0.0, time.perf_counter()
    for i in range(cases):
        fmt = rng.choice(sorted(files))
        kind = rng.choice(["truncate", "bitflip", "splat", "metadata"])
        path = folder / f"case{files[fmt].suffix}"
        path.write_bytes(mutate(originals[fmt], kind, rng, fmt))
        for name, call in loaders(fmt, path, folder).items():
            t0 = time.perf_counter()
            try:
                call()
                outcome = "ok"
            except BaseException as exc:  # noqa: B902 - the point is to see every kind
                outcome = type(exc).__name__
                if not acceptable(name, exc):
                    bad.append(dict(case=i, fmt=fmt, kind=kind, loader=name, error=outcome, msg=str(exc)[:300],
                                    where=traceback.format_exc().splitlines()[-3:-1]))
            slowest = max(slowest, time.perf_counter() - t0)
            counts[f"{name} {outcome}"] += 1
    return dict(counts=dict(counts), bad=bad, slowest_s=slowest, total_s=time.perf_counter() - start)


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
