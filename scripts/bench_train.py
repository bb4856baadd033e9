"""Benchmark the issue-3 recipe through the real entry point.

odenet / resnet / rknet (and odenet with other gradient modes) for 3 epochs on
mnist-10k: dopri5, rtol=atol=1e-3, batch 128, SGD lr 0.1 momentum 0.9, no
augmentation. Per epoch it reports median seconds per iteration, mean forward
and backward NFE per iteration, and test accuracy, read back from each run's
TensorBoard events. ``--reference`` also times a torchdiffeq ODE-Net (same
architecture and recipe, ``pip install .[bench]``) in this process.

Runs one job at a time so timings do not compete for cores; safe to leave in
the background (``nohup python scripts/bench_train.py > bench.log &``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = ["solver=dopri5", "rtol=1e-3", "atol=1e-3", "trainer.batch_size=128",
          "optim=sgd", "optim.lr=0.1", "optim.momentum=0.9", "dataset.augment=false", "eval.rtols=[]",
          "dataset.download=false", "trainer.progress=false"]
RUNS = {
    "odenet-adjoint": ["model=odenet", "solver.grad=adjoint"],
    "odenet-adjoint-seminorm": ["model=odenet", "solver.grad=adjoint", "solver.seminorm=true"],
    "odenet-checkpoint": ["model=odenet", "solver.grad=checkpoint"],
    "rknet": ["model=rknet"],
    "resnet": ["model=resnet"],
}


def per_epoch(run_dir: Path) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((run_dir / "tb").rglob("events.out.tfevents.*")).parent), size_guidance={"scalars": 0})
    acc.Reload()
    s = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    rows, prev = [], 0
    for (end, acc_), (_, f), (_, b) in zip(s["test/acc"], s["nfe/forward_epoch"], s["nfe/backward_epoch"]):
        times = [v for step, v in s["time/iter"] if prev < step <= end]
        rows.append({"s_per_iter": statistics.median(times), "nfe_forward": f, "nfe_backward": b, "test_acc": acc_})
        prev = end
    return rows


def run_job(name: str, overrides: list[str], data_dir: Path, out: Path, epochs: int, seed: int) -> list[dict]:
    run_dir = out / name
    cmd = [sys.executable, "-m", "neuralode.train", *RECIPE, f"trainer.epochs={epochs}", *overrides,
           f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"seed={seed}"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return per_epoch(run_dir)


def torchdiffeq_odenet(seed: int, tol: float = 1e-3):
    """Our ODE-Net (same init for the same seed) with its block solved by torchdiffeq's
    odeint_adjoint (dopri5, rtol=atol=tol); ``block.func.nfe`` counts evaluations."""
    import torch
    import torchdiffeq

    from neuralode.models import odenet
    from neuralode.models.odeblock import ODEBlock, SolverSettings

    class Counted(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f, self.nfe = f, 0

        def forward(self, t, x):
            self.nfe += 1
            return self.f(t, x)

    def tdq_forward(self, x):
        return torchdiffeq.odeint_adjoint(self.func, x, self.t, rtol=tol, atol=tol, method="dopri5")[-1]

    torch.manual_seed(seed)
    model = odenet(1, 10, SolverSettings())
    block = next(m for m in model.modules() if isinstance(m, ODEBlock))
    block.func = Counted(block.func)
    block.forward = tdq_forward.__get__(block)
    return model, block


def torchdiffeq_reference(data_dir: Path, epochs: int = 3, seed: int = 0) -> list[dict]:
    """The same ODE-Net and recipe with torchdiffeq's odeint_adjoint."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from neuralode.data import EpochSampler, image_datasets

    model, block = torchdiffeq_odenet(seed)
    train, test = image_datasets("mnist", data_dir, [0.1307], [0.3081], download=False)
    sampler = EpochSampler(len(train), seed)
    loader, test_loader = DataLoader(train, 128, sampler=sampler), DataLoader(test, 500)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rows = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        times, fw, bw = [], [], []
        for x, y in loader:
            tic = time.perf_counter()
            block.func.nfe = 0
            loss = F.cross_entropy(model(x), y)
            fw.append(block.func.nfe)
            block.func.nfe = 0
            opt.zero_grad()
            loss.backward()
            opt.step()
            bw.append(block.func.nfe)
            times.append(time.perf_counter() - tic)
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
        rows.append({"s_per_iter": statistics.median(times), "nfe_forward": statistics.mean(fw),
                     "nfe_backward": statistics.mean(bw), "test_acc": correct / len(test)})
        print(f"  torchdiffeq epoch {epoch + 1}: {rows[-1]}", flush=True)
    return rows


def gradient_error(data_dir: Path, tol: float = 1e-3) -> None:
    """Relative error of each library's parameter gradient at ``tol`` on the first batch at
    initialisation, against our direct gradient at rtol=atol=1e-7."""
    import torch
    import torch.nn.functional as F

    from neuralode.data import image_datasets
    from neuralode.models import odenet
    from neuralode.models.odeblock import SolverSettings

    train, _ = image_datasets("mnist", data_dir, [0.1307], [0.3081], download=False)
    x = torch.stack([train[i][0] for i in range(128)])
    y = torch.tensor([train[i][1] for i in range(128)])

    def grad(model: torch.nn.Module) -> torch.Tensor:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        return torch.cat([p.flatten() for p in g]).double()

    def ours(settings: SolverSettings) -> torch.nn.Module:
        torch.manual_seed(0)
        return odenet(1, 10, settings)

    ref = grad(ours(SolverSettings(rtol=1e-7, atol=1e-7, grad="direct")))
    cases = {f"ours {m}": grad(ours(SolverSettings(rtol=tol, atol=tol, grad=m))) for m in ("adjoint", "checkpoint")}
    cases["torchdiffeq adjoint"] = grad(torchdiffeq_odenet(0, tol)[0])
    for name, g in cases.items():
        cos = torch.dot(g, ref) / (g.norm() * ref.norm())
        print(f"{name:22s} at {tol:g}: relative error {(g - ref).norm() / ref.norm():.3f}, cosine {cos:.4f}")


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| run | epoch | s/iter | NFE fwd | NFE bwd | test acc |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for i, r in enumerate(rows, 1):
            lines.append(f"| {name} | {i} | {r['s_per_iter']:.3f} | {r['nfe_forward']:.1f} | "
                         f"{r['nfe_backward']:.1f} | {r['test_acc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist-10k")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time torchdiffeq (needs the bench extra)")
    parser.add_argument("--seed", type=int, default=0, help="model init and data order, for both libraries")
    parser.add_argument("--gradient-error", action="store_true",
                        help="only compare adjoint gradient errors of both libraries (needs the bench extra)")
    args = parser.parse_args()
    if args.gradient_error:
        return gradient_error(args.data_dir.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.reference:
        results["torchdiffeq-adjoint"] = torchdiffeq_reference(args.data_dir.resolve(), args.epochs, args.seed)
    for name in args.runs:
        results[name] = run_job(name, RUNS[name], args.data_dir.resolve(), args.out, args.epochs, args.seed)
        (args.out / "bench.json").write_text(json.dumps(results, indent=2))
        print(table({name: results[name]}), flush=True)
    (args.out / "bench.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
