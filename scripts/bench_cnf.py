"""CNF benchmark (issue 4): toy 2-D densities against their exact entropies, RNODE against no
regularisation, and an MNIST bits/dim smoke run.

    python scripts/bench_cnf.py toy --dataset 8gaussians --budget 900 --kinetic 0.01 --jacobian 0.01 \
        --out /tmp/cnf_8g_rnode.json
    python scripts/bench_cnf.py mnist --data-dir ../shared/data/mnist-10k --iters 20

``toy`` trains for ``--budget`` seconds on ``--clock`` (wall time, or this process's CPU
time, which a shared machine disturbs less; the learning rate decays over the same clock, so
runs are not bit-reproducible), then reports test NLL (exact trace, tight tolerance, held-out samples), the data's entropy, the
forward NFE of the last training iterations and of the test solve, and the wall time. The
model and loss are the ones ``model=cnf`` uses (``neuralode.models.cnf``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuralode import record_stats  # noqa: E402
from neuralode.data.toy2d import entropy, sample_toy  # noqa: E402
from neuralode.models import SolverSettings, solver_overrides  # noqa: E402
from neuralode.models.cnf import bits_per_dim, cnf_2d, cnf_image, dequantize_logit  # noqa: E402


def toy(args) -> dict:
    torch.manual_seed(args.seed)
    solver = SolverSettings(method="dopri5", rtol=args.rtol, atol=args.atol, grad=args.grad)
    regularise = args.kinetic > 0 or args.jacobian > 0
    model = cnf_2d(solver, hidden=[args.width] * args.depth, activation=args.activation, trace="exact",
                   regularise=regularise)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train = sample_toy(args.dataset, args.n_train, 2 * args.seed)
    test = sample_toy(args.dataset, args.n_test, 2 * args.seed + 1)
    g = torch.Generator().manual_seed(args.seed)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    start, wall_start, cpu_start = clock(), time.perf_counter(), time.process_time()
    it, recent = 0, []
    while clock() - start < args.budget:
        frac = (clock() - start) / args.budget  # cosine decay over the budget
        for group in opt.param_groups:
            group["lr"] = args.lr * max(0.02, 0.5 * (1 + math.cos(math.pi * frac)))
        x = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        with record_stats() as st:
            lp, kin, jac = model.log_prob(x)
            nll = -lp.mean()
            loss = nll + args.kinetic * kin.mean() + args.jacobian * jac.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        it += 1
        recent.append((nll.item(), st.nfe_forward, st.nfe_backward, kin.mean().item(), jac.mean().item()))
        if it % args.log_every == 0:
            m = [sum(r[i] for r in recent[-args.log_every:]) / args.log_every for i in range(5)]
            print(f"[{args.tag}] it {it} wall {time.perf_counter() - wall_start:.0f}s cpu {time.process_time() - cpu_start:.0f}s nll {m[0]:.4f} nfe_f {m[1]:.1f} "
                  f"nfe_b {m[2]:.1f} kin {m[3]:.3f} jac {m[4]:.3f}", flush=True)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    tail = recent[-min(20, len(recent)):]
    model.eval()
    nlls, nfes = [], []
    with torch.no_grad(), solver_overrides(model, rtol=args.test_tol, atol=args.test_tol):
        for chunk in test.split(2000):
            with record_stats() as st:
                lp, _, _ = model.log_prob(chunk, with_regularisers=False)
            nlls.append(-lp)
            nfes.append(st.nfe_forward)
    with torch.no_grad():  # NFE of a plain forward solve at the training tolerance
        with record_stats() as st:
            model.log_prob(test[:2000], with_regularisers=False)
    test_nll = torch.cat(nlls)
    h, h_se = entropy(args.dataset)
    res = dict(dataset=args.dataset, kinetic=args.kinetic, jacobian=args.jacobian, iters=it, wall_s=wall, cpu_s=cpu,
               clock=args.clock, s_per_iter_wall=wall / max(it, 1), s_per_iter_cpu=cpu / max(it, 1), test_nll=float(test_nll.mean()),
               test_nll_se=float(test_nll.std() / math.sqrt(len(test_nll))), entropy=h, entropy_se=h_se,
               gap=float(test_nll.mean()) - h, train_nfe_forward_last20=sum(r[1] for r in tail) / len(tail),
               train_nfe_backward_last20=sum(r[2] for r in tail) / len(tail),
               eval_nfe_forward_train_tol=st.nfe_forward, eval_nfe_forward_test_tol=sum(nfes) / len(nfes),
               rtol=args.rtol, test_tol=args.test_tol, grad=args.grad, batch=args.batch, lr=args.lr,
               width=args.width, depth=args.depth, threads=torch.get_num_threads())
    print(json.dumps(res, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def mnist(args) -> dict:
    from torchvision import datasets, transforms

    torch.manual_seed(args.seed)
    train = datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor())
    test = datasets.MNIST(args.data_dir, train=False, transform=transforms.ToTensor())
    solver = SolverSettings(method="dopri5", rtol=args.rtol, atol=args.atol, grad=args.grad)
    regularise = args.kinetic > 0 or args.jacobian > 0
    model = cnf_image(solver, (1, 28, 28), hidden=[args.width] * args.depth, num_blocks=args.blocks,
                      trace="hutchinson", noise="rademacher", regularise=regularise)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, args.batch, shuffle=True)
    times, cpu_times, it = [], [], 0
    for x, _ in loader:
        tic, cpu_tic = time.perf_counter(), time.process_time()
        y, logdet = dequantize_logit(x)
        with record_stats() as st:
            lp, kin, jac = model.log_prob(y)
            bpd = bits_per_dim(lp, logdet, y[0].numel()).mean()
            loss = bpd + args.kinetic * kin.mean() + args.jacobian * jac.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        it += 1
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)
        print(f"[mnist] it {it} bpd {bpd.item():.3f} nfe_f {st.nfe_forward} nfe_b {st.nfe_backward} "
              f"wall {times[-1]:.2f}s cpu {cpu_times[-1]:.2f}s", flush=True)
        if it >= args.iters:
            break
    model.eval()
    x = torch.stack([test[i][0] for i in range(args.n_test_images)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        y, logdet = dequantize_logit(x, generator=g)
        lp, _, _ = model.log_prob(y, with_regularisers=False)
    res = dict(iters=it, s_per_iter=sum(times) / len(times), s_per_iter_median=sorted(times)[len(times) // 2],
               cpu_s_per_iter=sum(cpu_times) / len(cpu_times), nfe_forward_last=st.nfe_forward,
               nfe_backward_last=st.nfe_backward,
               train_bpd_last=bpd.item(), test_bpd=float(bits_per_dim(lp, logdet, 784).mean()),
               n_test_images=args.n_test_images, batch=args.batch, width=args.width, depth=args.depth,
               blocks=args.blocks, rtol=args.rtol, grad=args.grad, threads=torch.get_num_threads())
    print(json.dumps(res, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["toy", "mnist"])
    p.add_argument("--dataset", default="8gaussians")
    p.add_argument("--budget", type=float, default=900.0, help="training seconds (toy), on --clock")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="budget in wall seconds, or in this process's CPU seconds (fair on a shared machine)")
    p.add_argument("--kinetic", type=float, default=0.0)
    p.add_argument("--jacobian", type=float, default=0.0)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--test-tol", type=float, default=1e-6)
    p.add_argument("--grad", default="direct", choices=["direct", "adjoint", "checkpoint"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--activation", default="softplus")
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--n-test-images", type=int, default=200)
    p.add_argument("--iters", type=int, default=20, help="training iterations (mnist)")
    p.add_argument("--data-dir", default="../shared/data/mnist-10k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.tag = args.tag or f"{args.dataset} k={args.kinetic} j={args.jacobian}"
    toy(args) if args.which == "toy" else mnist(args)


if __name__ == "__main__":
    main()
