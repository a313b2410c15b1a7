"""lenet5's benchmark suite: one command, one table, one JSON file.

    python benchmarks/suite.py --data-dir ../shared/mnist --out docs/results/benchmarks-cpu.json \
        [--cpu-class avx2|avx512|avx512-bf16] [--tf-python /path/to/tf-venv/bin/python] [--device cuda] [--quick]

What it measures, each part in fresh processes so no setting of one leaks into another, and
every ratio against a baseline measured in the same run (these machines are noisy):

1. machine: CPU, its class (lenet5.hardware; --cpu-class emulates a lesser one), cores, torch,
   device, and the measured peak of a large matmul in fp32 and bf16;
2. training images/s per model and batch size, lenet5's loop against a plain PyTorch
   DataLoader loop (benchmarks/train_throughput.py), with the share of the matmul peak reached
   (FLOPs per training image counted by torch.utils.flop_counter);
3. time to 99.0% test accuracy: `lenet5 train --recipe fast --stop-at 0.99`, wall-clock from
   process start (imports and data loading included) to the end of the epoch that reaches it,
   median over seeds and the fraction of seeds that reach it;
4. contention: a classic lenet5 epoch alone, beside a process that keeps one core busy, and two
   trainings at once, with the thread governor and with a fixed thread count;
5. the reference notebook's recipe end to end (`lenet5 train` as typed, and in fp32 where that
   picked bf16) with its share of the matmul peak over the whole wall time and, with
   --tf-python, the same recipe in Keras (benchmarks/peers/keras_lenet.py) in the same run;
6. inference: batch images/s and single-image latency, PyTorch eager (fp32, bf16), TorchScript
   and ONNX Runtime when installed (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_throughput  # noqa: E402  (this folder's script, reused for part 2)

from lenet5.evaluate import EVAL_BATCH  # noqa: E402
from lenet5.models import create_model  # noqa: E402
from lenet5.hardware import (EMULATE, choose_precision, cpu_class, hardware_class, probe_used,  # noqa: E402
                             restart_emulating, usable_cores)
from lenet5.hardware import matmul_peak as hardware_matmul_peak  # noqa: E402
from lenet5.runtime import cpu_model  # noqa: E402

# (model, batch, precision): the batch sizes users use, and the settings the recipes use.
TRAIN_SETTINGS = {
    "cpu": [("lenet5", 64, "fp32"), ("lenet5", 256, "fp32"), ("lenet5", 256, "bf16"), ("keras-lenet", 32, "fp32"),
            ("keras-lenet", 32, "bf16"), ("keras-lenet", 128, "bf16"), ("lenet5-1998", 16, "fp32")],
    "cuda": [("lenet5", 256, "fp32"), ("lenet5", 1024, "bf16"), ("keras-lenet", 32, "fp32"),
             ("keras-lenet", 128, "bf16"), ("keras-lenet", 512, "bf16"), ("lenet5-1998", 256, "fp32")],
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """GFLOP/s of an n x n x n matrix product: the ceiling training is measured against. On a CPU the
    best single product over about a second (lenet5.hardware.matmul_peak): a mean over back-to-back
    products read 135 GFLOP/s where the best read 186-188 on the same EPYC, and a lower ceiling
    would flatter every share of it."""
    if device == "cpu":
        return hardware_matmul_peak(dtype, n) / 1e9
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(50):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 50 / (time.perf_counter() - started) / 1e9


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(), "device": device,
                            "cpu_class": cpu_class(), "cpu_flags_class": _native_class(),
                            "emulation": {k: os.environ[k] for k in sorted({k for e in EMULATE.values() for k in e})
                                          if k in os.environ}}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    n = 2048 if device == "cpu" else 8192
    bf16_native = choose_precision("auto", torch.device(device)).precision == "bf16"
    # emulated bf16 runs at ~1 GFLOP/s: a smaller product shows that in seconds, not minutes
    info["matmul_gflops"] = {"fp32": round(matmul_peak(device, torch.float32, n)),
                             "bf16": round(matmul_peak(device, torch.bfloat16, n if bf16_native else 512), 1)}
    info["bf16_probe"] = probe_used()  # where the flags promise bf16: what decided the precision and recipes
    info["hardware_class"] = hardware_class(torch.device(device))  # what the recipes were chosen by
    return info


def _native_class() -> str:
    """The class without emulation, from a clean child process."""
    env = {k: v for k, v in os.environ.items() if k not in {k for e in EMULATE.values() for k in e}}
    code = "from lenet5.hardware import cpu_class; print(cpu_class())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def training_flops_per_image(name: str) -> float:
    """Forward + backward FLOPs of one image (convolutions and matrix products, as counted by PyTorch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lenet5 import native

    model = create_model(name)
    x = torch.rand(8, 1, 28, 28)
    with native.disabled(), FlopCounterMode(display=False) as counter:  # the counter cannot see into native ops
        model.loss(model(x), torch.zeros(8, dtype=torch.long)).backward()
    return counter.get_total_flops() / 8


def part_training(args: argparse.Namespace, peak: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    bf16_fast = choose_precision("auto", torch.device(args.device)).precision == "bf16"
    for name, batch, precision in TRAIN_SETTINGS[args.device]:
        if precision == "bf16" and not bf16_fast:
            continue  # emulated bf16: minutes per setting, and no recipe uses it here
        ours, plain = [], []
        for _ in range(args.rounds):  # alternating, so machine noise hits both
            ours.append(train_throughput.measure("lenet5", name, batch, args, precision))
            plain.append(train_throughput.measure("tensors", name, batch, args))
        flops = training_flops_per_image(name)
        row = {"model": name, "batch_size": batch, "precision": precision,
               "lenet5_images_per_s": statistics.median(ours), "plain_loop_images_per_s": statistics.median(plain),
               "training_mflop_per_image": flops / 1e6}
        row["ratio"] = row["lenet5_images_per_s"] / row["plain_loop_images_per_s"]
        row["share_of_matmul_peak"] = row["lenet5_images_per_s"] * flops / 1e9 / peak[precision]
        log(f"train {name:<12} batch {batch:>4} {precision}: {row['lenet5_images_per_s']:>9,.0f} img/s, plain loop "
            f"{row['plain_loop_images_per_s']:>8,.0f} ({row['ratio']:.2f}x), {row['share_of_matmul_peak']:.0%} of peak")
        rows.append(row)
    return rows


def lenet5_train(args: argparse.Namespace, out_dir: Path, name: str, *options: str) -> dict[str, Any]:
    """`lenet5 train` in a fresh process: its wall-clock time from launch to exit, and its history."""
    if args.quick:
        options = (*options, "--train-samples", "2000", "--test-samples", "500")
    command = [sys.executable, "-m", "lenet5", "train", *options, "--device", args.device, "--quiet",
               "--offline", "--out-dir", str(out_dir), "--name", name]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    history = json.loads((out_dir / name / "history.json").read_text())
    return {"wall_seconds": wall, "history": history, "command": " ".join(["lenet5", "train", *options])}


def part_time_to_99(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    runs = []
    options = ["--recipe", "fast", "--stop-at", "0.99", *args.fast_options]
    for seed in range(args.seeds):
        run = lenet5_train(args, out_dir, f"fast-{seed}", *options, "--seed", str(seed))
        hist = run["history"]
        reached = next((r for r in hist if r["test_acc"] >= 0.99), None)
        until = hist[: hist.index(reached) + 1] if reached else hist
        runs.append({"seed": seed, "reached": reached is not None, "wall_seconds": run["wall_seconds"],
                     "train_seconds": sum(r["train_seconds"] for r in until), "epochs": len(until),
                     "test_acc": [r["test_acc"] for r in hist]})
        log(f"time to 99%: seed {seed}: {'reached' if reached else 'NOT reached'} "
            f"{max(r['test_acc'] for r in hist):.2%}, {run['wall_seconds']:.1f} s wall, "
            f"{runs[-1]['train_seconds']:.2f} s training")
    good = [r for r in runs if r["reached"]]
    return {"command": " ".join(["lenet5", "train", *options, "--seed", "S"]), "runs": runs,
            "fraction_reached": len(good) / len(runs),
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in good) if good else None,
            "median_train_seconds": statistics.median(r["train_seconds"] for r in good) if good else None}


def run_flops(history: list[dict[str, Any]], model: str, train_images: int = 60_000, test_images: int = 10_000) -> float:
    """The arithmetic a run did: every epoch's training images forward and backward, test images forward."""
    train = training_flops_per_image(model)
    return len(history) * (train_images * train + test_images * train / 3)


def part_keras_recipe(args: argparse.Namespace, out_dir: Path, peak: dict[str, float]) -> list[dict[str, Any]]:
    """`lenet5 train` as a user types it (precision auto), and in the other precision where auto took bf16."""
    rows = []
    auto_is_fp32 = choose_precision("auto", torch.device(args.device)).precision == "fp32"
    for precision in ("auto",) if auto_is_fp32 else ("auto", "fp32"):
        run = lenet5_train(args, out_dir, f"keras-{precision}", *(["--precision", precision] if precision != "auto" else []))
        used = json.loads((out_dir / f"keras-{precision}" / "run.json").read_text())["precision"]
        flops = run_flops(run["history"], "keras-lenet")
        rows.append({"who": f"lenet5 ({used}{', auto' if precision == 'auto' else ''})", "command": run["command"],
                     "precision": used, "wall_seconds": run["wall_seconds"],
                     "train_seconds": sum(r["train_seconds"] for r in run["history"]),
                     "share_of_matmul_peak": flops / run["wall_seconds"] / 1e9 / peak[used],
                     "test_acc": [r["test_acc"] for r in run["history"]]})
        log(f"keras recipe, lenet5 {used}: {run['wall_seconds']:.1f} s wall, {rows[-1]['share_of_matmul_peak']:.0%} "
            f"of the {used} peak, test acc {rows[-1]['test_acc']}")
    if args.tf_python:
        command = [str(args.tf_python), str(HERE / "peers" / "keras_lenet.py"), "--data-dir", str(args.data_dir)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the Keras peer failed:\n{done.stderr[-2000:]}")
        peer = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"who": f"Keras (TensorFlow {peer['tensorflow']})", "command": "python benchmarks/peers/keras_lenet.py",
                     "wall_seconds": wall, "train_seconds": peer["fit_seconds"], "test_acc": peer["val_accuracy"]})
        log(f"keras recipe, Keras: {wall:.1f} s wall, test acc {peer['val_accuracy']}")
    return rows


def part_contention(args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    """A classic lenet5 epoch alone, beside a process that keeps one core busy, and two at once; each
    with the default thread governor and with the count fixed at the cores (the behaviour before it)."""
    options = ["--model", "lenet5", "--optimizer", "adam", "--batch-size", "128", "--epochs", "1", "--test-samples",
               "1000", "--device", "cpu", "--quiet", "--offline", "--out-dir", str(out_dir)]
    if args.data_dir:
        options += ["--data-dir", str(args.data_dir)]
    if args.quick:
        options += ["--train-samples", "2000"]

    def trainings(names: list[str], extra: list[str]) -> list[float]:
        runs = [subprocess.Popen([sys.executable, "-m", "lenet5", "train", *options, "--name", name, *extra],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in names]
        for run in runs:
            if run.wait() != 0:
                raise SystemExit(f"contention run failed: {run.stderr.read()[-2000:]}")
        return [json.loads((out_dir / name / "history.json").read_text())[0]["train_seconds"] for name in names]

    def one_core_busy(names: list[str], extra: list[str]) -> list[float]:
        busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 600\nwhile time.time() < end: pass"])
        try:
            return trainings(names, extra)
        finally:
            busy.kill()
            busy.wait()

    rows = []
    for label, extra in (("governor (default)", []), (f"--threads {usable_cores()} (fixed)", ["--threads", str(usable_cores())])):
        tag = "g" if not extra else "f"
        # An epoch takes seconds, so one cloud hiccup moves a single run by half: each condition runs
        # `--rounds` times (quiet, busy and pair in turn), and the middle run of each is compared.
        quiets, busies, pairs = [], [], []
        for r in range(args.rounds):
            quiets += trainings([f"quiet-{tag}{r}"], extra)
            busies += one_core_busy([f"busy-{tag}{r}"], extra)
            pairs.append(trainings([f"pair-a-{tag}{r}", f"pair-b-{tag}{r}"], extra))
        quiet, contended = statistics.median_low(quiets), statistics.median_low(busies)
        pair = sorted(pairs, key=max)[(len(pairs) - 1) // 2]  # the pair whose slower run is the median_low
        row = {"threads": label, "quiet_s": quiet, "one_core_busy_s": contended, "two_at_once_s": pair,
               "one_core_busy_ratio": contended / quiet, "two_at_once_ratio": max(pair) / quiet,
               "rounds": {"quiet_s": quiets, "one_core_busy_s": busies, "two_at_once_s": pairs}}
        log(f"contention, {label}: quiet {quiet:.1f} s, one core busy {contended:.1f} s ({row['one_core_busy_ratio']:.2f}x), "
            f"two at once {pair[0]:.1f}/{pair[1]:.1f} s ({row['two_at_once_ratio']:.2f}x)")
        rows.append(row)
    return rows


def part_inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs in a fresh process (see --inference-worker) so training's settings do not leak in."""
    command = [sys.executable, __file__, "--inference-worker", "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"inference benchmark failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def inference_worker(device: str) -> list[dict[str, Any]]:
    from lenet5.runtime import tune_allocator

    tune_allocator()
    torch.manual_seed(0)
    rows = []
    batch = torch.rand(10_000, 1, 28, 28, device=device)
    one = batch[:1].clone()
    # Batch inference as `lenet5 evaluate` runs it: chunks that keep a CPU's caches warm.
    chunk = EVAL_BATCH if device == "cpu" else len(batch)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, x, repeats) -> float:
        def all_chunks():
            for start in range(0, len(x), chunk):
                fn(x[start:start + chunk])

        all_chunks()
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            all_chunks()
        sync()
        return (time.perf_counter() - started) / repeats

    def latency(fn, repeats=300) -> float:
        fn(one)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(one)
            sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    for name in ("lenet5", "keras-lenet", "lenet5-1998"):
        model = create_model(name).to(device, memory_format=torch.channels_last).eval()
        runners = {}

        def eager(x, model=model):
            with torch.inference_mode():
                return model.logits(model(x))

        def eager_bf16(x, model=model):
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                return model.logits(model(x))

        runners["eager fp32"] = eager
        if choose_precision("auto", torch.device(device)).precision == "bf16":
            runners["eager bf16"] = eager_bf16
        from lenet5.export import Scores

        with torch.no_grad():
            traced = torch.jit.trace(Scores(model).eval(), batch[:8])
            if device == "cpu":  # freezing folds the layers for oneDNN (it trips an assert on CUDA)
                traced = torch.jit.freeze(traced)
        runners["torchscript (traced" + (", frozen)" if device == "cpu" else ")")] = lambda x, t=traced: t(x)
        if device == "cpu":
            try:
                import onnxruntime as ort

                from lenet5.export import _onnx_bytes

                session = ort.InferenceSession(_onnx_bytes(Scores(model).eval(), batch[:8]),
                                               providers=["CPUExecutionProvider"])
                runners["onnx runtime"] = lambda x, s=session: s.run(None, {"images": x.numpy()})[0]
            except ImportError:
                pass
        for how, fn in runners.items():
            per_batch = timed(fn, batch, 5 if device == "cpu" else 50)
            rows.append({"model": name, "runtime": how, "images": len(batch), "chunk": chunk,
                         "images_per_s": len(batch) / per_batch, "latency_ms": latency(fn) * 1e3})
    return rows


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    emulated = ", ".join(f"{k}={v}" for k, v in m.get("emulation", {}).items())
    lines = [f"### CPU class {m.get('cpu_class', '?')}" + (f" (emulated on an {m['cpu_flags_class']} CPU: {emulated})"
                                                           if emulated else ""), "",
             f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if "gpu" in m else "")
             + f"; matmul peak {m['matmul_gflops']['fp32']:,} GFLOP/s fp32, {m['matmul_gflops']['bf16']:,} bf16"
             + (f"; bf16 probe {m['bf16_probe']['speedup']:.2f}x fp32, recipes of class {m['hardware_class']}"
                if m.get("bf16_probe") else ""), ""]
    if "training" in results:
        lines += ["| model | batch | precision | lenet5 img/s | plain DataLoader loop img/s | ratio | share of matmul peak |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['batch_size']} | {r['precision']} | {r['lenet5_images_per_s']:,.0f} | "
                  f"{r['plain_loop_images_per_s']:,.0f} | {r['ratio']:.2f}x | {r['share_of_matmul_peak']:.0%} |"
                  for r in results["training"]]
        lines.append("")
    if "time_to_99" in results:
        t = results["time_to_99"]
        median = f"{t['median_wall_seconds']:.1f} s" if t["median_wall_seconds"] else "never"
        training = f"{t['median_train_seconds']:.2f} s" if t["median_train_seconds"] else "-"
        lines += [f"time to 99.0% (`{t['command']}`): median {median} wall from process start "
                  f"({training} of training), {t['fraction_reached']:.0%} of {len(t['runs'])} seeds reach it", ""]
    if "keras_recipe" in results:
        lines += ["| the notebook's recipe (3 epochs) | wall s | training s | share of matmul peak (wall) "
                  "| test accuracy per epoch |", "|---|---:|---:|---:|---|"]
        lines += [f"| {r['who']} | {r['wall_seconds']:.1f} | {r['train_seconds']:.1f} | "
                  + (f"{r['share_of_matmul_peak']:.0%}" if "share_of_matmul_peak" in r else "-") + " | "
                  + ", ".join(f"{a:.2%}" for a in r["test_acc"]) + " |" for r in results["keras_recipe"]]
        lines.append("")
    if "contention" in results:
        lines += ["| classic lenet5, one epoch (batch 128, Adam) | quiet s | one core busy s | two at once s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['quiet_s']:.1f} | {r['one_core_busy_s']:.1f} ({r['one_core_busy_ratio']:.2f}x) | "
                  f"{' / '.join(f'{t:.1f}' for t in r['two_at_once_s'])} ({r['two_at_once_ratio']:.2f}x) |"
                  for r in results["contention"]]
        lines.append("")
    if "inference" in results:
        chunk = results["inference"][0]["chunk"]
        lines += [f"| model | runtime | img/s (10,000 images, batches of {chunk:,}) | single-image latency ms |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['runtime']} | {r['images_per_s']:,.0f} | {r['latency_ms']:.3f} |"
                  for r in results["inference"]]
    return "\n".join(lines)


PARTS = ("training", "time_to_99", "contention", "keras_recipe", "inference")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: lenet5's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    parser.add_argument("--images", type=int, default=12_800, help="training images per timed pass")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per training setting and contention condition (median)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the time to 99%%")
    parser.add_argument("--fast-options", default="", help="options added to --recipe fast (e.g. for a GPU)")
    parser.add_argument("--tf-python", type=Path, help="a Python with TensorFlow, to run the Keras peer")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and the table beside it, .md)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the suite itself: tiny runs, "
                        "figures meaningless")
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="run the whole suite as a CPU of this class "
                        "(oneDNN/ATen/MKL instruction-set caps; default: this CPU as it is)")
    parser.add_argument("--inference-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"--parts: no part {', '.join(map(repr, unknown))}; the parts are {', '.join(PARTS)}")
    restart_emulating(args.cpu_class)  # so that every part (and the peak) runs under the class's caps
    args.fast_options = args.fast_options.split()
    if args.inference_worker:
        print(json.dumps(inference_worker(args.device)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    parts = args.parts.split(",")
    results: dict[str, Any] = {"benchmark": "suite", "command": "python " + " ".join(sys.argv),
                               "machine": machine(args.device)}
    log(f"machine: {results['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        if "training" in parts:
            results["training"] = part_training(args, results["machine"]["matmul_gflops"])
        if "time_to_99" in parts:
            results["time_to_99"] = part_time_to_99(args, Path(tmp))
        if "contention" in parts:
            results["contention"] = part_contention(args, Path(tmp))
        if "keras_recipe" in parts:
            results["keras_recipe"] = part_keras_recipe(args, Path(tmp), results["machine"]["matmul_gflops"])
    if "inference" in parts:
        results["inference"] = part_inference(args)
    text = table(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"`{results['command']}`\n\n{text}\n")


if __name__ == "__main__":
    main()
