"""CNF benchmark (issue 4): toy 2-D densities against their exact entropies, RNODE against no
regularisation, and an MNIST bits/dim smoke run.

    python scripts/bench_cnf.py toy --dataset 8gaussians --budget 900 --kinetic 0.01 --jacobian 0.01 \
        --out /tmp/cnf_8g_rnode.json
    python scripts/bench_cnf.py mnist --data-dir ../shared/data/mnist-10k --iters 20
    python scripts/bench_cnf.py fm --dataset 8gaussians --coupling exact_ot --batch 256 --fm-iters 10000 \
        --test-tol 1e-5 --out /tmp/fm_8g_ot.json
    python scripts/bench_cnf.py fm --dataset 8gaussians --coupling exact_ot --batch 128 --lr 1e-2 --activation swish \
        --fm-iters 3000 --eval-every 500 --test-tol 1e-5     # time to FFJORD's NLL
    python scripts/bench_cnf.py fm --dataset checkerboard --batch 256 --lr 1e-2 --activation swish --fm-iters 10000 \
        --test-tol 1e-5 --then-ml 300 --clock cpu --kinetic 0.05 --jacobian 0.05 --ml-lr 1e-2 --ml-tol 1e-4
    python scripts/bench_cnf.py fm --dataset mnist --coupling independent --budget 3600 --clock cpu --batch 64 \
        --lr 1e-3 --ema 0.99 --n-test-images 100 --eval-batch 25 --test-tol 1e-5 --grid docs/fm_mnist_samples.png

    python scripts/bench_cnf.py sampling --run outputs/fm_checkerboard [--data-dir ../shared/data/mnist-10k]

``sampling`` re-measures a finished ``neuralode-train`` CNF run's sampler from its checkpoint (the
``samples/*`` scalars: sampling NFE and energy distances), with this checkout's code.

``fm`` (issue 14, docs/flow_matching.md) trains by flow matching for ``--fm-iters`` iterations
(images: ``--budget`` seconds), reports test NLL ± s.e. through dopri5 at ``--test-tol`` with its
NFE, sampling NFE at 1e-3/1e-5 (dopri5, tsit5), energy distances after 1/2/4/8 Euler steps and the
adaptive solves, and (``--then-ml``) the same after ML(+RNODE) fine-tuning of the same weights.

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
        _cosine(opt, args.lr, (clock() - start) / args.budget)  # cosine decay over the budget
        nll, kin, jac, st = _ml_step(model, opt, train[torch.randint(0, len(train), (args.batch,), generator=g)], args)
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


# -- flow matching (issue 14) ------------------------------------------------------------------------
def _ml_step(model, opt, x: torch.Tensor, args):
    """One maximum-likelihood step (RNODE weights from ``args``): (nll, kinetic, jacobian, solver stats)."""
    with record_stats() as st:
        lp, kin, jac = model.log_prob(x)
        nll = -lp.mean()
        loss = nll + args.kinetic * kin.mean() + args.jacobian * jac.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return nll, kin, jac, st


def _cosine(opt, lr: float, frac: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * max(0.02, 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _toy_nll(model, test: torch.Tensor, tol: float) -> tuple[float, float, float]:
    """Test NLL (exact trace, dopri5 at rtol=atol=tol) with its standard error and the mean forward
    NFE per 2,000-point solve."""
    model.eval()
    nlls, nfes = [], []
    with torch.no_grad(), solver_overrides(model, method="dopri5", rtol=tol, atol=tol):
        for chunk in test.split(2000):
            with record_stats() as st:
                lp, _, _ = model.log_prob(chunk, with_regularisers=False)
            nlls.append(-lp.double())
            nfes.append(st.nfe_forward)
    model.train()
    nll = torch.cat(nlls)
    return float(nll.mean()), float(nll.std() / math.sqrt(len(nll))), sum(nfes) / len(nfes)


def fm(args) -> dict:
    """Flow matching (OT-CFM or independent CFM), optionally followed by ML(+RNODE) fine-tuning of
    the same model through the solver; the losses and evaluation are the ones ``model=cnf
    model.objective=flow_matching`` uses."""
    from neuralode.models.flow_matching import fm_loss, ot_permutation
    from neuralode.tasks.cnf import sample_quality

    if args.dataset == "mnist":
        return fm_mnist(args)
    torch.manual_seed(args.seed)
    solver = SolverSettings(method="dopri5", rtol=args.rtol, atol=args.atol, grad=args.grad)
    model = cnf_2d(solver, hidden=[args.width] * args.depth, activation=args.activation, trace="exact",
                   regularise=args.kinetic > 0 or args.jacobian > 0)
    train = sample_toy(args.dataset, args.n_train, 2 * args.seed)
    test = sample_toy(args.dataset, args.n_test, 2 * args.seed + 1)
    h, h_se = entropy(args.dataset)
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    ot_cpu, curve, eval_wall, eval_cpu = 0.0, [], 0.0, 0.0
    for it in range(1, args.iters + 1):
        _cosine(opt, args.lr, (it - 1) / args.iters)
        x1 = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g)
        if args.coupling == "exact_ot":
            c = time.process_time()
            x0 = x0[ot_permutation(x0, x1)]
            ot_cpu += time.process_time() - c
        loss = fm_loss(lambda t, x: model(x, t=t), x0, x1, args.sigma, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % args.log_every == 0:
            print(f"[{args.tag}] it {it} fm_loss {loss.item():.4f} wall {time.perf_counter() - wall0 - eval_wall:.0f}s",
                  flush=True)
        if args.eval_every and (it % args.eval_every == 0 or it == args.iters):  # excluded from the clocks
            w, c = time.perf_counter(), time.process_time()
            nll, se, _ = _toy_nll(model, test[:2000], args.test_tol)
            curve.append(dict(iters=it, wall_s=w - wall0 - eval_wall, cpu_s=c - cpu0 - eval_cpu, gap_2k=nll - h))
            print(f"[{args.tag}] it {it}: test NLL (2k points) {nll:.4f}, gap {nll - h:.4f}", flush=True)
            eval_wall += time.perf_counter() - w
            eval_cpu += time.process_time() - c
    fm_wall, fm_cpu = time.perf_counter() - wall0 - eval_wall, time.process_time() - cpu0 - eval_cpu

    def evaluate() -> dict:
        nll, se, nfe = _toy_nll(model, test, args.test_tol)
        model.eval()
        q = sample_quality(model, test[:2000], test[2000:4000])
        model.train()
        return dict(test_nll=nll, test_nll_se=se, gap=nll - h, nll_nfe=nfe, **{k.split("/", 1)[1]: v for k, v in q.items()})

    res = dict(dataset=args.dataset, run=f"{'OT-CFM' if args.coupling == 'exact_ot' else 'I-CFM'}", iters=args.iters,
               batch=args.batch, lr=args.lr, sigma=args.sigma, wall_s=fm_wall, cpu_s=fm_cpu, ot_cpu_s=ot_cpu,
               ot_cpu_share=ot_cpu / max(fm_cpu, 1e-9), entropy=h, entropy_se=h_se, test_tol=args.test_tol,
               n_test=len(test), curve=curve, threads=torch.get_num_threads(), fm=evaluate())
    print(json.dumps(res["fm"], indent=2), flush=True)
    if args.then_ml > 0:  # maximum-likelihood (+RNODE) fine-tuning of the same weights, through the solver
        for block in model.blocks:
            block.regularise = args.kinetic > 0 or args.jacobian > 0
        opt = torch.optim.Adam(model.parameters(), lr=args.ml_lr)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        start, w0, c0, it = clock(), time.perf_counter(), time.process_time(), 0
        with solver_overrides(model, rtol=args.ml_tol, atol=args.ml_tol):
            while clock() - start < args.then_ml:
                _cosine(opt, args.ml_lr, (clock() - start) / args.then_ml)
                nll, _, _, st = _ml_step(model, opt, train[torch.randint(0, len(train), (args.ml_batch,), generator=g)],
                                         args)
                it += 1
                if it % 25 == 0:
                    print(f"[{args.tag} ML] it {it} nll {nll.item():.4f} nfe_f {st.nfe_forward} "
                          f"wall {time.perf_counter() - w0:.0f}s", flush=True)
        res.update(run=res["run"] + " then ML+RNODE", ml_iters=it, ml_wall_s=time.perf_counter() - w0,
                   ml_cpu_s=time.process_time() - c0, ml_lr=args.ml_lr, ml_tol=args.ml_tol, kinetic=args.kinetic,
                   jacobian=args.jacobian, ml_last_train_nfe=st.nfe_forward)
        res["total_wall_s"], res["total_cpu_s"] = fm_wall + res["ml_wall_s"], fm_cpu + res["ml_cpu_s"]
        res["ml"] = evaluate()
        print(json.dumps(res["ml"], indent=2), flush=True)
    print(json.dumps({k: v for k, v in res.items() if k not in ("fm", "ml", "curve")}, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def fm_mnist(args) -> dict:
    """Flow matching of the ML CNF's conv field on MNIST in its logit space (alpha ``--logit-alpha``),
    EMA of the weights, then bits/dim of ``--n-test-images`` test images through the reverse ODE
    (Hutchinson, Rademacher, fixed noise) at ``--test-tol`` and a sample grid."""
    from torchvision import datasets, transforms
    from torchvision.utils import make_grid

    from neuralode.models.cnf import logit_inverse
    from neuralode.models.flow_matching import EMAField, fm_loss, ot_permutation, update_ema
    from neuralode.tasks.cnf import sample_quality

    torch.manual_seed(args.seed)
    train = datasets.MNIST(args.data_dir, train=True, transform=transforms.ToTensor())
    test = datasets.MNIST(args.data_dir, train=False, transform=transforms.ToTensor())
    solver = SolverSettings(method="dopri5", rtol=args.test_tol, atol=args.test_tol, grad="direct")
    model = cnf_image(solver, (1, 28, 28), hidden=[args.width] * args.depth, num_blocks=1, trace="hutchinson",
                      noise="rademacher")
    for block in model.blocks:
        block.net = EMAField(block.net, args.ema)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, args.batch, shuffle=True, drop_last=True)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    start, w0, c0, it = clock(), time.perf_counter(), time.process_time(), 0
    while clock() - start < args.budget:
        for x, _ in loader:
            _cosine(opt, args.lr, (clock() - start) / args.budget)
            y, _ = dequantize_logit(x, args.logit_alpha)
            x0 = torch.randn_like(y)
            if args.coupling == "exact_ot":
                x0 = x0[ot_permutation(x0, y)]
            loss = fm_loss(lambda t, v: model(v, t=t), x0, y, args.sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(model)
            it += 1
            if it % args.log_every == 0:
                print(f"[mnist fm] it {it} loss {loss.item():.4f} wall {time.perf_counter() - w0:.0f}s", flush=True)
            if clock() - start >= args.budget:
                break
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    model.eval()
    n = args.n_test_images
    x = torch.stack([test[i][0] for i in range(n)])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # fixed Hutchinson noise
    bpds, nfes = [], []
    e0 = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(args.eval_batch):
            y, logdet = dequantize_logit(chunk, args.logit_alpha, generator=g)
            with record_stats() as st:
                lp, _, _ = model.log_prob(y, with_regularisers=False)
            bpds.append(bits_per_dim(lp, logdet, 784).double())
            nfes.append(st.nfe_forward)
    eval_wall = time.perf_counter() - e0
    bpd = torch.cat(bpds)
    nq = args.n_sample_images
    ref = torch.stack([test[i][0] for i in range(n, n + nq)])
    floor = torch.stack([test[i][0] for i in range(n + nq, n + 2 * nq)])
    q = sample_quality(model, ref, floor, 1.0, lambda v: logit_inverse(v, args.logit_alpha))
    with solver_overrides(model, rtol=1e-3, atol=1e-3):
        grid = make_grid(logit_inverse(model.sample(64, generator=torch.Generator().manual_seed(0)), args.logit_alpha),
                         nrow=8, padding=2, pad_value=1.0)
    if args.grid:
        from torchvision.utils import save_image
        save_image(grid, args.grid)
    res = dict(dataset="mnist", run=("OT-CFM" if args.coupling == "exact_ot" else "I-CFM") + " conv", iters=it,
               batch=args.batch, wall_s=wall, cpu_s=cpu, test_bpd=float(bpd.mean()),
               test_bpd_se=float(bpd.std() / math.sqrt(len(bpd))), n_test_images=n, bpd_nfe=sum(nfes) / len(nfes),
               test_tol=args.test_tol, eval_wall_s=eval_wall, width=args.width, depth=args.depth, ema=args.ema,
               logit_alpha=args.logit_alpha, n_sample_images=nq, threads=torch.get_num_threads(),
               **{k.split("/", 1)[1]: v for k, v in q.items()})
    print(json.dumps(res, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def sampling(args) -> dict:
    from omegaconf import OmegaConf

    from neuralode.run import Run
    from neuralode.tasks import build_task

    _, state = Run.load_checkpoint(args.run)
    cfg = OmegaConf.create(state["config"])
    if "channels" in cfg.dataset:
        cfg.data_dir = args.data_dir
    task = build_task(cfg)
    task.model.load_state_dict(state["model"])
    task.datasets()
    start = time.perf_counter()
    res = dict(run=args.run, **task.sample_metrics(), wall_s=time.perf_counter() - start, threads=torch.get_num_threads())
    print(json.dumps(res, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["toy", "mnist", "fm", "sampling"])
    p.add_argument("--run", default=None, help="sampling: a neuralode-train run dir (or its .pt)")
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
    fmg = p.add_argument_group("fm (flow matching; --dataset mnist for images)")
    fmg.add_argument("--coupling", default="exact_ot", choices=["exact_ot", "independent"])
    fmg.add_argument("--sigma", type=float, default=0.0)
    fmg.add_argument("--fm-iters", dest="fm_iters", type=int, default=10_000, help="flow-matching iterations (2-D)")
    fmg.add_argument("--eval-every", type=int, default=0, help="2-D: test NLL on 2,000 points every this many "
                     "iterations (not counted in the times)")
    fmg.add_argument("--then-ml", type=float, default=0.0, help="then ML(+RNODE) fine-tuning for this many "
                     "seconds on --clock (--kinetic/--jacobian, --ml-lr, --ml-tol, --ml-batch)")
    fmg.add_argument("--ml-lr", type=float, default=1e-3)
    fmg.add_argument("--ml-tol", type=float, default=1e-4)
    fmg.add_argument("--ml-batch", type=int, default=512)
    fmg.add_argument("--ema", type=float, default=0.999, help="mnist: EMA decay")
    fmg.add_argument("--logit-alpha", type=float, default=0.05, help="mnist")
    fmg.add_argument("--eval-batch", type=int, default=50, help="mnist: test images per solve")
    fmg.add_argument("--n-sample-images", type=int, default=16, help="mnist: images per sample-quality solve")
    fmg.add_argument("--grid", default=None, help="mnist: write a 8x8 sample grid (PNG) here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.tag = args.tag or f"{args.dataset} k={args.kinetic} j={args.jacobian}"
    if args.which == "sampling":
        sampling(args)
    elif args.which == "fm":
        args.iters = args.fm_iters if args.dataset != "mnist" else args.iters
        args.tag = args.tag if "k=" not in args.tag else f"{args.dataset} fm {args.coupling}"
        fm(args)
    else:
        toy(args) if args.which == "toy" else mnist(args)


if __name__ == "__main__":
    main()
