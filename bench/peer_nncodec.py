"""Benchmark: our coders against a peer, NNCodec (Fraunhofer HHI's implementation of the Neural
Network Coding standard ISO/IEC 15938-17, whose entropy coder is DeepCABAC), on the same networks.

    python bench/peer_nncodec.py --setup=True     # once: .venv-nncodec with nncodec==2.1.3
    python bench/peer_nncodec.py --runs_root=/work/runs

NNCodec pins numpy<2, so it runs in a virtual environment of its own (--setup=True makes it,
the system's packages visible so that torch is not downloaded again, its numpy<2 shadowing the
system's numpy 2). This process never imports it: it hands tensors to a worker, this file run by
the environment's python with --worker, as .npz files and JSON (no pickle).

For every row of bench/results/results.json with a shipped .dc file, the quantized layers
(cluster codes, positions and codebooks; biases and batch-norm are left out on both sides):
  - ours: the bytes of their sections when the decoded state is encoded with each coder
    (Huffman, ANS); a section holds the codebook (a float block: float32, or small integers on
    the grid stage 2 rounds it to) and a few bytes of framing;
  - NNCodec lossless: the same weights given as signed integer ranks (0 = pruned, +-r = the
    r-th centroid out from zero on that side), coded as integers and through its codebook mode,
    each decoded and checked equal in the worker; bytes = the bitstream + the codebooks as our
    file stores them (the same values, so the same bytes);
  - NNCodec's own pipeline, for the rows of the datasets in `pipeline` whose run folder holds
    stage 1's pruned checkpoint: the pruned weights of the same layers, uniformly quantized with
    dependent quantization and no retraining, at each QP of `qps` (coarsest first); the first
    whose validation accuracy reaches our decoded model's is kept (else the best, marked),
    and only that one is tested.
Prints a table and writes `out` with the CPU, NNCodec's version and the settings; with
`recipes`, the other rows of an earlier `out` are kept, each with the time it was measured.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datasets  # noqa: E402
import dcfile  # noqa: E402
import training  # noqa: E402
import util  # noqa: E402
from models import build_model  # noqa: E402
from results_table import replace_block  # noqa: E402

# -----------------------------------------------------------------------------
setup = False               # make the virtual environment `venv` with NNCodec in it, and stop
venv = ".venv-nncodec"      # the virtual environment whose python runs NNCodec (relative to the repository)
results = "bench/results/results.json"  # the rows (key runs) and their shipped .dc files (key file)
recipes = []                # only the rows of these recipes ([] = every row with a file)
runs_root = "out/bench"     # {runs_root}/{recipe}/seed{N}/ holds stage 1's *_pruned.pt for NNCodec's pipeline
pipeline = ["mnist"]        # datasets whose rows also run NNCodec's pipeline ('cifar10': slow on a CPU)
qps = list(range(-12, -42, -2))  # NNCodec's QPs, coarsest first: step 2**(qp / 4) at its qp_density 2
lambda_scale = 0.0          # NNCodec's rate-distortion weight in its quantizer (its default 0: distortion only)
data_root = ""              # where the data sets are ('' = the folder the pruned checkpoint recorded)
threads = 1                 # torch CPU threads (the machine is shared)
out = "bench/results/peer_nncodec.json"  # where the figures are written
doc = "docs/experiments.md"  # whose peer_nncodec block gets the table ('' = leave it)
readme = "README.md"        # whose nncodec block gets the summary, a row per recipe ('' = leave it)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

NNCODEC = "nncodec==2.1.3"
# NNCodec's exact codings of integer ranks: as integers (int32 tensors are coded as they are,
# NNR_PT_INT), and through its codebook mode on float32 ranks at QP 0, a step of exactly 1,
# without dependent quantization, so that every rank is its own level.
LOSSLESS = {"integer": (np.int32, {}),
            "codebook": (np.float32, dict(qp=0, use_dq=False, codebook_mode=1))}
TOLERANCE = 1e-9  # accuracies in percent read back from JSON: equal ones compare equal


def venv_python(path):
    return os.path.join(ROOT, path, "bin", "python")


def make_venv(path):
    """Make the virtual environment `path` (relative to the repository) that runs NNCodec: the
    system's packages visible, so torch is not downloaded again, and nncodec with its numpy<2
    installed inside it, shadowing the system's numpy."""
    for argv in ([sys.executable, "-m", "venv", "--system-site-packages", os.path.join(ROOT, path)],
                 [venv_python(path), "-m", "pip", "install", NNCODEC]):
        util.require(subprocess.run(argv).returncode == 0, f"{' '.join(argv)} failed (its output is above)")


# --- the weights as NNCodec takes them ---------------------------------------------------------

def signed_ranks(codebook, index, mask):
    """A quantized layer's weights as signed integer ranks: 0 where pruned or on a 0.0 centroid,
    +r for the r-th distinct positive centroid counted up from zero, -r for the r-th negative
    one counted down. -> (ranks int32 of index's shape, levels (m + 1 + n,) float32: the
    distinct non-zero centroids sorted with 0.0 between them, m = how many are negative);
    levels[ranks + m] rebuilds the weights (weights_from_ranks)."""
    codebook = np.asarray(codebook, np.float32)
    nonzero = np.unique(codebook[codebook != 0])
    m = int((nonzero < 0).sum())
    levels = np.insert(nonzero, m, np.float32(0.0))
    rank_of = (np.searchsorted(levels, codebook) - m).astype(np.int32)  # the rank of each cluster
    ranks = np.where(np.asarray(mask) == 1, rank_of[np.asarray(index, np.int64)], 0).astype(np.int32)
    return ranks, levels, m


def weights_from_ranks(ranks, levels, m):
    """The weights that signed ranks stand for: levels[ranks + m], float32."""
    return levels[np.asarray(ranks, np.int64) + m]


def layer_weights(codebook, index, mask):
    """The weights a quantized layer computes with: codebook[index] * mask, float32."""
    return np.asarray(codebook, np.float32)[np.asarray(index, np.int64)] * np.asarray(mask, np.float32)


def quantized_layers(state, quantized):
    """{layer: (codebook, index, mask) as numpy arrays} of a decoded state's quantized layers."""
    return {n: tuple(state[f"{n}.{leaf}"].numpy() for leaf in ("codebook", "index", "mask")) for n in quantized}


def ranks_of(layers):
    """{layer: int32 ranks} of quantized layers, each checked to rebuild its weights exactly.
    Raises RuntimeError where one does not (it cannot: a bug)."""
    ranks = {}
    for name, (codebook, index, mask) in layers.items():
        r, levels, m = signed_ranks(codebook, index, mask)
        if not np.array_equal(weights_from_ranks(r, levels, m), layer_weights(codebook, index, mask)):
            raise RuntimeError(f"{name}: the signed ranks do not rebuild the layer's weights")
        ranks[name] = r
    return ranks


# --- bytes ----------------------------------------------------------------------------------------

def section_bytes(report):
    """{layer: bytes} of the quantized layers' sections in an encode_model report (cluster codes,
    positions, the codebook and the section's framing)."""
    return {r["name"]: r["bytes"] for r in report["layers"] if r["kind"] == "quantized"}


def codebook_bytes(codebook):
    """Bytes of a codebook (k,) as our file stores it (dcfile's float block): what NNCodec's
    figures add for it, since NNCodec codes the ranks, not the values."""
    return len(dcfile._float_block(np.asarray(codebook, np.float32)))


def ours(state, header, coder):
    """Our bytes of a decoded file's quantized layers under `coder`: {'bytes', 'layers'}."""
    index_bits = header.get("settings", {}).get("index_bits", 0)
    _, report = dcfile.encode_model(state, header["model"], header["quantized"], index_bits, coder=coder)
    layers = section_bytes(report)
    return dict(bytes=sum(layers.values()), layers=layers)


# --- NNCodec's pipeline: the QP -------------------------------------------------------------------

def first_reaching(sweep, validation, target):
    """Walk `sweep` ([{'qp', ...}], coarsest first), adding each entry's validation accuracy
    (validation(entry) -> percent) until one reaches `target`. -> (the chosen entry, the
    entries walked, whether the chosen one reached target: else it is the best walked, fewer
    bytes breaking a tie)."""
    walked = []
    for entry in sweep:
        walked.append(dict(entry, validation=validation(entry)))
        if walked[-1]["validation"] >= target - TOLERANCE:
            return walked[-1], walked, True
    return max(walked, key=lambda e: (e["validation"], -e["bytes"])), walked, False


def pruned_checkpoint(cfg, row):
    """The path of the row's stage-1 pruned checkpoint in its run folder, or None."""
    folder = os.path.join(cfg["runs_root"], row["recipe"], f"seed{row['seed']}")
    found = sorted(f for f in os.listdir(folder) if f.endswith("_pruned.pt")) if os.path.isdir(folder) else []
    return os.path.join(folder, found[0]) if found else None


def decoded_net(pruned, weights):
    """Stage 1's network with `weights` ({layer: array}) in place of those layers' weights and
    masks where they are non-zero, the rest as the pruned checkpoint has it: the network that
    NNCodec's bitstream and the checkpoint's other tensors describe."""
    args = dcfile.without_pretrained_download(pruned["model"])
    net = build_model(args["name"], **args["kwargs"])
    net.load_state_dict(pruned["state_dict"])
    for name, w in weights.items():
        layer = net.get_submodule(name)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(layer.weight.shape)
        layer.mask.data = (layer.weight.data != 0).float()
    return net.eval()


def accuracy(net, batches):
    _, correct, total = training.evaluate(net, batches)
    return training.percent(correct, total)


# --- the worker: this file under the virtual environment's python -------------------------------

def run_worker(cfg, folder, jobs):
    """Run the NNCodec worker on `jobs` (written to folder/jobs.json, inputs already in folder)
    -> its answer, folder/answer.json."""
    util.write_json(os.path.join(folder, "jobs.json"), jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([venv_python(cfg["venv"]), os.path.abspath(__file__), "--worker", folder],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the NNCodec worker failed (exit {done.returncode}): {done.stderr[-2000:]}")
    with open(os.path.join(folder, "answer.json")) as f:
        return json.load(f)


def _nnc_round_trip(nnc, params, options):
    """Code `params` ({name: array}) with NNCodec -> (bitstream bytes, decoded {name: array})."""
    bitstream = nnc.compress(params, bitstream_path=None, return_bitstream=True, **options)
    return len(bitstream), nnc.decompress(bytearray(bitstream))


def nnc_lossless(nnc, ranks):
    """NNCodec's bytes for integer ranks ({layer: int32 array}) in each mode of LOSSLESS: the
    bitstream of all the layers, and each layer's coded alone (its own start and parameter-set
    units included). Raises RuntimeError where a decode is not exactly what was coded."""
    answer = {}
    for mode, (dtype, options) in LOSSLESS.items():
        params = {k: v.astype(dtype) for k, v in ranks.items()}
        total, decoded = _nnc_round_trip(nnc, params, options)
        layers = {k: _nnc_round_trip(nnc, {k: v}, options)[0] for k, v in params.items()}
        for k, v in params.items():
            if k not in decoded or decoded[k].shape != v.shape or not np.array_equal(decoded[k], v):
                raise RuntimeError(f"NNCodec's {mode} mode does not decode {k} to what it coded")
        answer[mode] = dict(bitstream=total, layers=layers)
    return answer


def nnc_pipeline(nnc, weights, qps, lambda_scale, folder, stem):
    """NNCodec's lossy coding of float32 `weights` at each QP (its defaults otherwise: dependent
    quantization, qp_density 2): [{'qp', 'bitstream', 'decoded': the .npz in folder holding
    what the bitstream decodes to}]."""
    sweep = []
    for qp in qps:
        size, decoded = _nnc_round_trip(nnc, weights, dict(qp=qp, lambda_scale=lambda_scale))
        name = f"{stem}_qp{qp}.npz"
        np.savez(os.path.join(folder, name), **{k: np.asarray(decoded[k], np.float32) for k in weights})
        sweep.append(dict(qp=qp, bitstream=size, decoded=name))
    return sweep


def worker(folder):
    """The NNCodec side: answer the jobs of folder/jobs.json ([{'kind': 'lossless' | 'pipeline',
    'input': an .npz in folder, 'qps', 'lambda_scale'}]) in folder/answer.json."""
    from nncodec import nnc  # here only: NNCodec lives in the virtual environment, not beside our code

    with open(os.path.join(folder, "jobs.json")) as f:
        jobs = json.load(f)
    answers = []
    for job in jobs:
        with np.load(os.path.join(folder, job["input"]), allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
        stem = os.path.splitext(job["input"])[0]
        answers.append(nnc_lossless(nnc, tensors) if job["kind"] == "lossless"
                       else nnc_pipeline(nnc, tensors, job["qps"], job["lambda_scale"], folder, stem))
    util.write_json(os.path.join(folder, "answer.json"), dict(nncodec=version("nncodec"), answers=answers))


# --- main -----------------------------------------------------------------------------------------

def block(result):
    """The text between docs/experiments.md's peer_nncodec markers, from the JSON main writes."""
    rows, qps, here = result["rows"], result["settings"]["qps"], provenance(result)
    runs = sorted({tuple(row.get(k, here[k]) for k in ("cpu", "threads", "nncodec")) for row in rows})
    when = sorted({row.get("measured", here["measured"]) for row in rows})
    return (table(rows) + "\n\n" + "; ".join(f"{cpu}, {threads} thread(s), NNCodec {v}" for cpu, threads, v in runs)
            + f"; measured {', '.join(when)}; QPs {qps[0]} to {qps[-1]}, coarsest first.")


def table(rows):
    """The comparison, a row per results row: bytes of the quantized layers, accuracies in percent."""
    lines = ["| row | ours Huffman B | ours ANS B | NNCodec lossless B (mode) | ANS vs NNCodec lossless "
             "| NNCodec pipeline: QP, B, val / test | ours val / test |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        n, p = r["nncodec_lossless"], r["nncodec_pipeline"]
        if p is None:
            pipe = "-"
        else:
            pipe = (f"{p['qp']}, {p['bytes']:,}, {p['validation']:.2f}% / {p['test']:.2f}%"
                    + ("" if p["reached"] else f" (best: none reached ours; stage 1 {p['stage1_validation']:.2f}%)"))
        lines.append(f"| {r['recipe']} s{r['seed']} | {r['ours']['huffman']['bytes']:,} "
                     f"| {r['ours']['ans']['bytes']:,} | {n['bytes']:,} ({n['mode']}) | {r['ans_vs_nncodec']:+.1f}% "
                     f"| {pipe} | {r['accuracy']['validation']:.2f}% / {r['accuracy']['test']:.2f}% |")
    return "\n".join(lines)


def summary(rows):
    """The README's table: a row per recipe, the means over its seeds of the bytes of the
    quantized layers under each coder, and ANS against NNCodec's two figures."""
    lines = ["| recipe | ours, Huffman B | ours, ANS B | NNCodec lossless B | ANS vs NNCodec lossless "
             "| NNCodec's pipeline B, at our validation accuracy | ANS vs NNCodec's pipeline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == recipe]
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        ans, lossless = mean(lambda r: r["ours"]["ans"]["bytes"]), mean(lambda r: r["nncodec_lossless"]["bytes"])
        piped = [r for r in rs if r["nncodec_pipeline"] and r["nncodec_pipeline"]["reached"]]
        pipe = sum(r["nncodec_pipeline"]["bytes"] for r in piped) / len(piped) if piped else None
        ans_piped = sum(r["ours"]["ans"]["bytes"] for r in piped) / len(piped) if piped else None
        seeds = f" ({len(rs)} seeds)" if len(rs) > 1 else ""
        lines.append(f"| {recipe}{seeds} | {mean(lambda r: r['ours']['huffman']['bytes']):,.0f} | {ans:,.0f} "
                     f"| {lossless:,.0f} | {100 * (ans / lossless - 1):+.1f}% | "
                     + (f"{pipe:,.0f}" + (f" ({len(piped)} of {len(rs)} seeds)" if len(piped) < len(rs) else "")
                        + f" | {100 * (ans_piped / pipe - 1):+.1f}% |" if piped else "- | - |"))
    return "\n".join(lines)


def prepare(cfg, i, run, folder):
    """Decode the shipped file of results row `run`, measure our coders on it and write the
    worker's inputs to folder: ranks{i}.npz, and pruned{i}.npz (stage 1's weights of the same
    layers) where NNCodec's pipeline runs on it. -> (row, (path, pruned checkpoint) or None)."""
    state, header = dcfile.decode_file(run["file"])
    layers = quantized_layers(state, header["quantized"])
    np.savez(os.path.join(folder, f"ranks{i}.npz"), **ranks_of(layers))
    row = dict(recipe=run["recipe"], seed=run["seed"], model=run["model"], file=run["file"],
               dataset=header.get("data", {}).get("dataset"),
               clusters={n: int(len(c)) for n, (c, _, _) in layers.items()},
               codebook_bytes={n: codebook_bytes(c) for n, (c, _, _) in layers.items()},
               nonzero={n: int((m == 1).sum()) for n, (_, _, m) in layers.items()},
               accuracy=dict(validation=100 - run["val_error"], test=100 - run["error"]["decoded"]),
               ours={coder: ours(state, header, coder) for coder in dcfile.CODERS})
    path = pruned_checkpoint(cfg, run) if row["dataset"] in cfg["pipeline"] else None
    if path is None:
        return row, None
    pruned = torch.load(path, weights_only=True, map_location="cpu")
    sd = pruned["state_dict"]
    np.savez(os.path.join(folder, f"pruned{i}.npz"),
             **{n: (sd[f"{n}.weight"] * sd[f"{n}.mask"]).numpy().astype(np.float32) for n in layers})
    return row, (path, pruned)


def lossless_figures(answer, codebooks):
    """A row's NNCodec lossless figures from the worker's answer ({mode: {'bitstream', 'layers'}})
    and its layers' codebook bytes ({layer: bytes}): each mode's bytes with the codebooks, the
    smaller named."""
    modes = {mode: dict(bytes=a["bitstream"] + sum(codebooks.values()), bitstream=a["bitstream"],
                        layers={n: b + codebooks[n] for n, b in a["layers"].items()})
             for mode, a in answer.items()}
    best = min(modes, key=lambda m: modes[m]["bytes"])
    return dict(mode=best, bytes=modes[best]["bytes"], modes=modes)


def pipeline_figures(pruned, sweep, folder, target, val, test):
    """NNCodec's pipeline on one row: the worker's sweep ([{'qp', 'bitstream', 'decoded'}]) walked
    on validation until it reaches `target`, the chosen QP tested once."""
    weights = lambda e: dict(np.load(os.path.join(folder, e["decoded"]), allow_pickle=False))  # noqa: E731
    sweep = [dict(qp=e["qp"], bytes=e["bitstream"], decoded=e["decoded"]) for e in sweep]  # the values are in it
    chosen, walked, reached = first_reaching(sweep, lambda e: accuracy(decoded_net(pruned, weights(e)), val), target)
    return dict(qp=chosen["qp"], bytes=chosen["bytes"], validation=chosen["validation"], reached=reached,
                test=accuracy(decoded_net(pruned, weights(chosen)), test),
                sweep=[dict(qp=e["qp"], bytes=e["bytes"], validation=e["validation"]) for e in walked])


def provenance(result):
    """What each row records of the run that measured it, for the rows of `result` (main's JSON)
    that do not say: {measured, cpu, nncodec, threads}."""
    return dict(measured=result["time"], cpu=result["cpu"], nncodec=result["nncodec"],
                threads=result["settings"]["threads"])


PROVENANCE = ("measured", "cpu", "nncodec", "threads")  # provenance()'s keys


def merge_rows(rows, now, earlier, runs):
    """The rows just measured, each given `now` ({key of PROVENANCE: value}), and, from an
    earlier result, the rows of the recipes not measured now that are still among the results'
    runs (dicts with recipe and seed), each keeping its own provenance (or its file's: time, cpu,
    nncodec, settings' threads); in the order of those runs."""
    order = {(r["recipe"], r["seed"]): i for i, r in enumerate(runs)}
    measured = {row["recipe"] for row in rows}
    kept = [{**provenance(earlier), **row} for row in (earlier or {}).get("rows", [])
            if row["recipe"] not in measured and (row["recipe"], row["seed"]) in order]
    return sorted(kept + [{**row, **now} for row in rows], key=lambda row: order[row["recipe"], row["seed"]])


def main(cfg):
    if cfg["setup"]:
        make_venv(cfg["venv"])
        print(f"made {cfg['venv']} with {NNCODEC}")
        return
    util.require(os.path.isfile(venv_python(cfg["venv"])),
                 f"no {cfg['venv']}: run python bench/peer_nncodec.py --setup=True first")
    util.require(os.path.isfile(cfg["results"]), f"no {cfg['results']}: run bench/pipeline.py first")
    with open(cfg["results"]) as f:
        every = [r for r in json.load(f)["runs"] if r.get("file")]
    runs = [r for r in every if r["recipe"] in (cfg["recipes"] or [r["recipe"]])]
    earlier = None  # with `recipes`, the other rows of an earlier `out` stay
    if cfg["recipes"] and os.path.isfile(cfg["out"]):
        with open(cfg["out"]) as f:
            earlier = json.load(f)
    util.require(runs, f"no row of {cfg['results']} with a shipped file (key file) among recipes {cfg['recipes']}")
    missing = [r["file"] for r in runs if not os.path.isfile(r["file"])]
    util.require(not missing, f"shipped files missing: {missing}: run from the repository root")
    util.require(cfg["qps"], "qps is empty: give NNCodec's pipeline a QP at least")
    torch.set_num_threads(cfg["threads"])
    load_before = os.getloadavg()
    rows, data = [], {}
    with tempfile.TemporaryDirectory() as folder:
        jobs, pipelines = [], {}  # pipelines: {row: (path, pruned checkpoint, its job)}
        for i, run in enumerate(runs):
            row, pruned = prepare(cfg, i, run, folder)
            rows.append(row)
            jobs.append(dict(kind="lossless", input=f"ranks{i}.npz"))
            if pruned:
                pipelines[i] = (*pruned, len(jobs))
                jobs.append(dict(kind="pipeline", input=f"pruned{i}.npz", qps=cfg["qps"],
                                 lambda_scale=cfg["lambda_scale"]))
            print(f"{run['file']}: {len(row['clusters'])} quantized layers, ours {row['ours']['huffman']['bytes']:,} B "
                  f"(Huffman) / {row['ours']['ans']['bytes']:,} B (ANS)"
                  + (f"; pipeline from {pruned[0]}" if pruned else ""))
        t0 = time.time()
        answer = run_worker(cfg, folder, jobs)
        print(f"NNCodec {answer['nncodec']}: {len(jobs)} jobs in {time.time() - t0:.0f} s")
        lossless = iter(a for a, job in zip(answer["answers"], jobs) if job["kind"] == "lossless")
        for i, row in enumerate(rows):
            row["nncodec_lossless"] = lossless_figures(next(lossless), row["codebook_bytes"])
            row["ans_vs_nncodec"] = 100 * (row["ours"]["ans"]["bytes"] / row["nncodec_lossless"]["bytes"] - 1)
            row["nncodec_pipeline"] = None
            if i in pipelines:
                path, pruned, j = pipelines[i]
                spec = datasets.DataSpec.from_settings(pruned["settings"],
                                                       data_root=cfg["data_root"] or pruned["settings"]["data_root"])
                if spec not in data:  # validation and test batches, read once per data set
                    data[spec] = datasets.load_data(spec, torch.device("cpu"))[1:]
                figures = pipeline_figures(pruned, answer["answers"][j], folder, row["accuracy"]["validation"],
                                           *data[spec])
                # stage 1's validation accuracy of the network, where a coder that does not retrain starts from
                recorded = pruned["metrics"].get("validation", {})
                p = row["nncodec_pipeline"] = dict(checkpoint=path, **figures,
                                                   stage1_validation=recorded.get("retrained", recorded.get("dense")))
                print(f"{row['recipe']} seed {row['seed']}: NNCodec QP {p['qp']}, {p['bytes']:,} B, validation "
                      f"{p['validation']:.2f}% (ours {row['accuracy']['validation']:.2f}%)")
    now = time.strftime("%Y-%m-%d %H:%M")
    rows = merge_rows(rows, dict(measured=now, cpu=util.cpu_model(), nncodec=answer["nncodec"],
                                 threads=cfg["threads"]), earlier, every)
    result = dict(rows=rows, nncodec=answer["nncodec"], cpu=util.cpu_model(), cpus=os.cpu_count(),
                  load_average=dict(before=load_before, after=os.getloadavg()), settings=cfg, time=now)
    util.write_json(cfg["out"], result)
    print(table(rows))
    if cfg["doc"]:
        replace_block(cfg["doc"], block(result), "<!-- peer_nncodec:begin -->", "<!-- peer_nncodec:end -->")
    if cfg["readme"]:
        replace_block(cfg["readme"], summary(rows), "<!-- nncodec:begin -->", "<!-- nncodec:end -->")
    print(f"CPU: {result['cpu']}, {cfg['threads']} thread(s), load average {load_before[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; NNCodec {answer['nncodec']}; wrote {cfg['out']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        util.run_stage(main, SETTINGS)
