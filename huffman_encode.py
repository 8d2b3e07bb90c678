"""Stage 3 of Deep Compression (Han, Mao & Dally 2016, sections 2 and 4): store the pruned,
quantized network as one file, decode that file into a fresh model, and check it bit for bit.
coder=huffman is the paper's: sparse positions as relative indices, cluster indices and
positions both Huffman coded. coder=ans (the default) also codes each layer under context
models with ANS and keeps whichever of the two sections is smaller: on LeNet-300-100 a file
about 20% smaller, and about 10% below the MPEG standard's coder
(docs/experiments.md#the-default-coder).

    python huffman_encode.py --model=lenet_300_100              # after quantization.py
    python huffman_encode.py --decode=out/lenet_300_100.dc

Encode mode reads {out_dir}/{model}_quantized.pt, writes {out_dir}/{model}.dc,
decodes it, checks every tensor against the checkpoint, tests both models and writes
{out_dir}/{model}_compressed.json. Decode mode rebuilds a model from a .dc file alone (no
checkpoint needed), tests it and saves it as {out_dir}/{model}_decoded.pt.

The file format: docs/format.md (dcfile.py, huffman.py, ans.py). Settings: docs/method.md.
"""
import os
import time

import training
import util
from datasets import DATASETS, DataSpec, load_data
from dcfile import CODERS, MAX_INDEX_BITS, VERSION, bit_equal, decode_file, encode_model, load_compressed
from models import check_model, file_stem
from quantize import build_quantized_model, load_quantized
from runtime import RUNTIMES, in_runtime, to_plain

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # the network pruning.py was given: reads {out_dir}/{model}_quantized.pt; with
                            # decode, name the factory a file's network comes from (nothing else imports it)
out_dir = "out"             # checkpoints, the compressed file and JSON summaries
data_root = ""              # folder holding the data set; '' = the one stage 2 used ('data' with --decode)
device = "auto"             # where the models are tested: auto (CUDA if available) | cpu | cuda:N
index_bits = {"*": 0}       # per layer: relative-index span bits (0 = the smallest section; the paper: conv 8, fc 5)
coder = "ans"               # ans (context models, each layer kept where smaller than its Huffman section) |
                            # huffman (the paper's, section 4)
decode = ""                 # path of a .dc file: rebuild and test the model from it alone ('' = encode)
runtime = "quantized"       # with decode, the layers tested: quantized | dense | sparse (CPU, runtime.py)
export = ""                 # with decode: also write the plain state dict (no masks) to this .pt file
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# --- the stage ---------------------------------------------------------------------------------

def check_settings(cfg):
    """Reject bad settings before any work, each with one line that names the fix."""
    check_model(cfg["model"])  # with decode, a factory the file's network needs (its code runs)
    util.require(cfg["runtime"] in RUNTIMES, f"unknown runtime {cfg['runtime']!r}; choose one of {', '.join(RUNTIMES)}")
    util.require(cfg["runtime"] == "quantized" or cfg["decode"], "--runtime applies to --decode=FILE.dc")
    util.require(not cfg["export"] or cfg["decode"], "--export writes a decoded model: give --decode=FILE.dc too")
    util.require(cfg["coder"] in CODERS, f"unknown coder {cfg['coder']!r}; choose one of {', '.join(CODERS)}")
    util.require(all(0 <= v <= MAX_INDEX_BITS for v in cfg["index_bits"].values()),
                 f"index_bits must be 0 (auto) or 1..{MAX_INDEX_BITS}, got {cfg['index_bits']}")


def byte_table(report, size):
    """Where every byte of the file went, as one string: a row per quantized layer, the raw
    tensors, the header, and the total line."""
    q = [r for r in report["layers"] if r["kind"] == "quantized"]
    raw = [r for r in report["layers"] if r["kind"] != "quantized"]
    w = max([6] + [len(r["name"]) + 1 for r in q])
    lines = [f"{'layer':<{w}}| {'non-zeros':^19} | weight bits  | span | index bits   | codebook | weights  "
             f"| indices  |  total   | ratio",
             f"{'':<{w}}| {'':19} | raw -> Huff. | bits | raw -> Huff. |    bytes |    bytes |    bytes "
             f"|    bytes | to dense"]
    for r in q:
        lines.append(
            f"{r['name']:<{w}}| {r['nonzero']:8} / {r['params']:8} | {r['weight_bits']:3d} -> "
            f"{r['weight_bits_huffman']:5.2f} | {'ans' if r.get('coder') == 'ans' else r['index_bits'] or 'none':>4} | "
            f"{r['index_bits_raw']:4.2f} -> "
            f"{r['index_bits_huffman']:4.2f} | {r['codebook_bytes']:8} | {r['weight_bytes']:8} | "
            f"{r['index_bytes']:8} | {r['bytes']:8} | {r['ratio']:6.1f}x")
    lines += [
        "(bits per non-zero; index bits count the fillers; span none: dense codes, one symbol per weight, "
        "0 = pruned, counted as weights; span ans: coded with ANS, indices = counts + presence bits; "
        "weights and indices include their code tables; "
        "the rest of a total is name, shape, counts and section framing with CRC)"]
    ans = [f"{r['name']} presence {r['presence']}, clusters {r['clusters_model']}"
           + (f" (rows as {r['image'][0]} x {r['image'][1]} images)"
              if "neighbours" in (r["presence"], r["clusters_model"]) else "") for r in q if r.get("coder") == "ans"]
    if ans:
        lines.append("ans models: " + "; ".join(ans))
    lines += [
        f"other tensors (biases, batch-norm, unquantized): "
        f"{sum(len(r.get('members', [r])) for r in raw)} tensors ({sum(r['kind'] == 'tabled' for r in raw)} as "
        f"value tables, {sum(len(r['members']) for r in raw if r['kind'] == 'shared')} in "
        f"{sum(r['kind'] == 'shared' for r in raw)} shared tables), {sum(r['bytes'] for r in raw)} bytes; "
        f"header, format version and end marker: {report['header_bytes']} bytes",
        f"dense float32: {report['dense_bytes']} bytes -> compressed file: {size} bytes "
        f"({report['dense_bytes'] / size:.1f} x)"]
    return "\n".join(lines)


def _test_set(data, data_root, device):
    """The test minibatches the earlier stages used. data: the settings a file's header
    records, {'dataset', 'subset', 'test_batch_size'} (and ImageNet's or a folder's image_size, workers)."""
    spec = DataSpec.from_settings({"val_split": 0.0, **data}, data_root=data_root, batch_size=data["test_batch_size"])
    return load_data(spec, device)[2]


def _test(net, test, device):
    """Print the test line of `net`; returns its accuracy in percent."""
    loss, correct, total = training.evaluate(net.to(device), test)
    print(training.test_line(loss, correct, total))
    return training.percent(correct, total)


def encode_main(cfg, dev):
    stem = os.path.join(cfg["out_dir"], file_stem(cfg["model"]))
    quantized_net, ckpt = load_quantized(stem + "_quantized.pt", "cpu")
    p = ckpt["settings"]["pruning"]
    # The header keeps what rebuilds and tests the model elsewhere, and no local paths.
    data = dict(dataset=p["dataset"], subset=p["subset"], test_batch_size=p["test_batch_size"],
                **(dict(image_size=p["image_size"], workers=p["workers"]) if p["dataset"] in ("imagenet", "folder")
                   else {}),
                # a folder's normalisation comes from its training images less the validation split
                **(dict(val_split=p["val_split"]) if p["dataset"] == "folder" else {}))

    t0 = time.time()
    # The decoder needs each layer's codebook size only; stage 2's other notes stay in its JSON.
    quantized = {name: dict(bits=q["bits"], clusters=q["clusters"]) for name, q in ckpt["quantized"].items()}
    blob, report = encode_model(ckpt["state_dict"], ckpt["model"], quantized, cfg["index_bits"],
                                info=dict(data=data, settings=dict(index_bits=cfg["index_bits"], coder=cfg["coder"])),
                                coder=cfg["coder"])
    path = stem + ".dc"
    util.write_bytes(path, blob)
    encode_seconds = time.time() - t0

    # Decode the file on disk, not the bytes in memory: what a user ships is what is checked.
    t0 = time.time()
    state, _ = decode_file(path)
    decode_seconds = time.time() - t0
    differ = sorted(set(state) ^ set(ckpt["state_dict"])) or \
        [k for k, v in ckpt["state_dict"].items() if not bit_equal(v, state[k])]
    if differ:
        raise RuntimeError(f"decoded tensors differ from {stem}_quantized.pt: {differ}")
    print(f"decoded {path}: all {len(state)} tensors equal the quantized checkpoint's bit for bit")

    decoded_net = build_quantized_model(ckpt["model"], quantized)
    decoded_net.load_state_dict(state)
    test = _test_set(data, cfg["data_root"] or ckpt["settings"]["data_root"], dev)
    print("--- quantized checkpoint ---")
    accuracy = dict(quantized=_test(quantized_net, test, dev))
    print("--- decoded from the compressed file ---")
    accuracy["decoded"] = _test(decoded_net, test, dev)

    size = os.path.getsize(path)
    print(byte_table(report, size))
    print(f"accuracy: quantized {accuracy['quantized']:.2f}% -> decoded {accuracy['decoded']:.2f}% "
          f"({'equal' if accuracy['quantized'] == accuracy['decoded'] else 'DIFFERENT'}); "
          f"encode {encode_seconds:.2f} s, decode {decode_seconds:.2f} s")
    summary = dict(model=cfg["model"], dataset=data["dataset"], stage="compressed", compressed_file=path,
                   format_version=VERSION, dense_bytes=report["dense_bytes"], compressed_bytes=size,
                   ratio=report["dense_bytes"] / size, header_bytes=report["header_bytes"], accuracy=accuracy,
                   layers=report["layers"], encode_seconds=round(encode_seconds, 3),
                   decode_seconds=round(decode_seconds, 3), settings=cfg, device=str(dev))
    util.write_json(stem + "_compressed.json", summary)
    print(f"saved {path} and {stem}_compressed.json")


def decode_main(cfg, dev):
    """Rebuild the model from the file alone, test it, and save it as a quantized checkpoint."""
    t0 = time.time()
    net, header = load_compressed(cfg["decode"], dev)
    print(f"decoded {cfg['decode']} ({os.path.getsize(cfg['decode'])} bytes, {header['model']['name']}) "
          f"in {time.time() - t0:.2f} s")
    util.require(cfg["runtime"] != "sparse" or dev.type == "cpu", "the sparse runtime runs on the CPU: --device=cpu")
    tested, header = in_runtime(net, header, cfg["runtime"])
    print(f"runtime {cfg['runtime']}" + (": " + ", ".join(f"{k} {v}" for k, v in header["runtime"].items())
                                          if "runtime" in header else ""))
    data = header.get("data")
    util.require(isinstance(data, dict) and data.get("dataset") in DATASETS
                 and all(type(data.get(k)) is int for k in ("subset", "test_batch_size"))
                 and all(type(data[k]) is int for k in ("image_size", "workers") if k in data)
                 and type(data.get("val_split", 0.0)) is float,
                 f"{cfg['decode']} names no test set; its model decodes but cannot be tested here")
    accuracy = _test(tested, _test_set(data, cfg["data_root"] or "data", dev), dev)
    path = os.path.join(cfg["out_dir"], file_stem(header["model"]["name"]) + "_decoded.pt")
    util.save_checkpoint(path, "quantized", net, header["model"], header.get("settings", {}),
                         dict(accuracy=dict(decoded=accuracy), source=cfg["decode"]), quantized=header["quantized"])
    print(f"saved {path} (a quantized checkpoint: load it with quantize.load_quantized)")
    if cfg["export"]:
        plain = {k: v.contiguous() for k, v in to_plain(net).cpu().state_dict().items()}
        util.save_tensors(cfg["export"], plain)
        print(f"exported {cfg['export']}: a plain state dict of {len(plain)} tensors "
              f"(torch.load(..., weights_only=True); nn.Linear / nn.Conv2d keys, no masks)")


def main(cfg):
    dev, _ = util.start_stage(cfg, check_settings)
    (decode_main if cfg["decode"] else encode_main)(cfg, dev)


if __name__ == "__main__":
    util.run_stage(main, SETTINGS, stage="huffman_encode")
