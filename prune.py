"""Masked layers and magnitude-pruning rules (Han et al. 2015, "Learning both Weights and
Connections"; Deep Compression section 2).

A masked layer keeps a `mask` buffer of the weight's shape and computes with `weight * mask`,
so a pruned connection contributes nothing and, by the chain rule, receives a zero gradient.
Pruning also zeroes the stored weight, so with any optimizer whose update is zero for a zero
weight with zero gradient (SGD with momentum and weight decay, Adam, AdamW) it stays exactly 0.

Dynamic network surgery (Guo, Yao & Chen 2016, "Dynamic Network Surgery for Efficient DNNs")
instead keeps the pruned weights and lets them train (`splice`): the forward pass still uses
weight * mask, but the gradient reaches every weight, and the mask is recomputed from the
magnitudes as training goes, so a connection pruned by mistake can grow back.
"""
import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_weight(layer):
    """The weight a masked layer computes with: weight * mask. With layer.splice set (dynamic
    network surgery) the value is the same but the gradient is the identity (a straight-through
    estimator, Guo et al. 2016 eq. 4), so pruned weights keep learning and may return."""
    w = layer.weight
    if layer.splice:
        out = w + (w * (layer.mask - 1)).detach()  # exactly w where mask is 1 and 0 where it is 0
    else:
        out = w * layer.mask
    if out.stride() != w.stride() and all(a == b or n == 1 for a, b, n in zip(out.stride(), w.stride(), w.shape)):
        # A weight with one input channel is both contiguous and channels_last, and the product
        # may come out with the other strides, which sends the conv (and every layer after it)
        # down the slow NCHW path: 1.3x a plain LeNet-5 step. Same memory, so a view fixes it.
        out = out.as_strided(w.shape, w.stride())
    return out


def variational_output(layer, x, op):
    """A training step's output of a layer under sparse variational dropout (Molchanov et al.
    2017, section 4.2): each weight is Gaussian, mean `weight`, variance exp(`log_sigma2`), and
    the local reparameterization trick samples the pre-activations instead of the weights,
    mean op(x, w) and variance op(x^2, sigma^2), one draw per example. op(x, w, bias) is the
    layer's linear map. The mask does not enter: a weight whose noise has grown past the
    threshold is noise, and the mask that drops it is read in evaluation only."""
    mean = op(x, layer.weight, layer.bias)
    var = op(x * x, torch.exp(layer.log_sigma2), None)
    # One normal per pre-activation, drawn as a flat run laid out in mean's strides (an output of
    # op is dense): torch's CPU sampler is vectorized for contiguous tensors only, and drawing
    # into a channels_last one took 37% of a LeNet-5 step. The draws are i.i.d., so the layout
    # does not change their law.
    noise = torch.randn(mean.numel(), dtype=mean.dtype, device=mean.device).as_strided(mean.shape, mean.stride())
    # A fast conv algorithm (Winograd, FFT) can return a tiny negative where the variance is 0.
    return mean + torch.sqrt(var.clamp_min(0) + 1e-8) * noise


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight (out, in) is multiplied by a 0/1 `mask` buffer of the same shape."""
    splice = False       # True while dynamic network surgery retrains the layer
    variational = False  # True while sparse variational dropout trains it (a log_sigma2 parameter)

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def forward(self, x):  # x: (N, *, in) -> (N, *, out)
        if self.variational and self.training:
            return variational_output(self, x, F.linear)
        return F.linear(x, masked_weight(self), self.bias)


class MaskedConv2d(nn.Conv2d):
    """nn.Conv2d whose weight (out, in/groups, kh, kw) is multiplied by a 0/1 `mask` buffer."""
    splice = False
    variational = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def forward(self, x):  # x: (N, C, H, W)
        if self.variational and self.training:
            return variational_output(self, x, self._conv_forward)
        return self._conv_forward(x, masked_weight(self), self.bias)


MASKED = (MaskedLinear, MaskedConv2d)


def _masked_twin(m):
    """A masked copy of an nn.Linear / nn.Conv2d sharing its parameters (same names, same order)."""
    if isinstance(m, nn.Linear):
        t = MaskedLinear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        t = MaskedConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                         padding=m.padding, dilation=m.dilation, groups=m.groups,
                         bias=m.bias is not None, padding_mode=m.padding_mode)
    t.weight = m.weight
    t.bias = m.bias
    t.mask = torch.ones_like(m.weight)
    return t


def to_masked(model):
    """Replace, in place and at any depth (nested Sequential blocks included), every nn.Linear
    and nn.Conv2d by its masked twin. Parameter names and order are unchanged; each masked
    layer adds one `<name>.mask` buffer. Returns the model."""
    for name, child in model.named_children():
        if type(child) in (nn.Linear, nn.Conv2d):
            setattr(model, name, _masked_twin(child))
        else:
            to_masked(child)
    return model


def layer_kind(module):
    """'conv' or 'fc': the key under which per-layer settings group a masked layer."""
    return "conv" if isinstance(module, nn.Conv2d) else "fc"


def masked_layers(model, which="all"):
    """[(name, module)] of the masked layers, in model order. which: 'all' | 'conv' | 'fc'."""
    if which not in ("all", "conv", "fc"):
        raise ValueError(f"prune_layers must be 'all', 'conv' or 'fc', not {which!r}")
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, MASKED) and which in ("all", layer_kind(m))]


def layer_value(setting, name, kind):
    """Resolve a per-layer setting for one layer.

    `setting` is a scalar (same for every layer) or a dict whose keys are, in order of
    precedence: the exact layer name ('fc1', 'layer1.0.conv2'), a glob ('layer4.*'),
    the layer kind ('conv' / 'fc'), and '*' (default)."""
    if not isinstance(setting, dict):
        return setting
    if name in setting:
        return setting[name]
    for key, value in setting.items():
        if key not in ("*", "conv", "fc") and fnmatch.fnmatchcase(name, key):
            return value
    if kind in setting:
        return setting[kind]
    if "*" in setting:
        return setting["*"]
    raise KeyError(f"no value for layer {name!r} (add a '*' default)")



def per_layer(model, setting, key, which="all"):
    """{layer name: value} of the per-layer setting `key` for every masked layer of `model`
    (which: 'all' | 'conv' | 'fc'). Raises ValueError naming the setting where a layer has
    no value."""
    try:
        return {name: layer_value(setting, name, layer_kind(m)) for name, m in masked_layers(model, which)}
    except KeyError as e:
        raise ValueError(f"{key}: {e.args[0]}") from None

# --- thresholds: pure functions of one weight tensor and its mask --------------------------

def std_threshold(weight, mask, sensitivity):
    """Han 2015 section 3: threshold = sensitivity x std of the layer's surviving weights.

    Taking the std over survivors (mask == 1), not over the zeros already pruned, makes the
    threshold rise from one prune/retrain iteration to the next, as iterative pruning needs.
    weight, mask: same shape. Returns a float."""
    alive = weight[mask.bool()]
    if alive.numel() < 2:
        return 0.0
    return float(alive.float().std() * sensitivity)


def percentile_threshold(weights, q):
    """Magnitude that prunes the q percent (0..100) smallest of the given surviving weights
    when pruning keeps |w| >= threshold. weights: any-shape tensor. Returns a float."""
    a = weights.detach().abs().flatten().float()
    k = round(a.numel() * q / 100)
    if k <= 0:
        return 0.0
    if k >= a.numel():
        return float("inf")
    return float(a.kthvalue(k + 1).values)  # kthvalue, unlike quantile, has no size limit


GRANULARITIES = ("weight", "kernel")  # or a number n (a string): an fc layer's inputs in runs of n


def magnitudes(weight, granularity="weight"):
    """The magnitude by which pruning ranks a layer's weights, shaped like the weight: |w|, or
    with granularity 'kernel' the root mean square of the kernel each weight belongs to (a
    conv's kh x kw slice of one filter at one input channel), so that pruning keeps or drops a
    kernel whole (Mao et al. 2017, 2-D sparsity): the coder's neighbour contexts then find a
    kernel's positions all but free after its first weight. An fc weight, or a 1 x 1 conv's, is
    its own kernel. A number n (a string) makes each run of n inputs of an fc row a kernel: an
    fc that reads a flattened (c, h, w) map takes one channel's map whole with n = h x w
    (LeNet-5's fc1, 50 maps of 4 x 4: '16'). weight (out, in, *kernel) -> same shape, >= 0."""
    if granularity == "weight" or (granularity == "kernel" and weight.dim() < 3):
        return weight.abs()
    runs = weight.flatten(2) if granularity == "kernel" else weight.reshape(weight.shape[0], -1, int(granularity))
    return runs.pow(2).mean(dim=2, keepdim=True).sqrt().expand_as(runs).reshape(weight.shape)


def apply_threshold(module, threshold, zero_weights=True, granularity="weight"):
    """Zero the mask wherever the magnitude (see magnitudes) < threshold (already-pruned stay
    pruned), and the weight there too unless surgery keeps it to splice back."""
    with torch.no_grad():
        module.mask.mul_((magnitudes(module.weight, granularity) >= threshold).to(module.mask.dtype))
        if zero_weights:
            module.weight.mul_(module.mask)


# --- model-level rules: return {layer name: threshold} --------------------------------------

def prune_by_std(model, sensitivity, which="all", surgery=False, granularity="weight"):
    """Per layer: threshold = std(survivors) x sensitivity (a float or per-layer dict), on the
    magnitudes of granularity (a string or per-layer dict, see magnitudes: a kernel's root mean
    square is compared with the threshold where it is 'kernel').
    surgery: keep the pruned weights and let the layers splice (prune_dns)."""
    out = {}
    for name, m in masked_layers(model, which):
        s = layer_value(sensitivity, name, layer_kind(m))
        out[name] = std_threshold(m.weight.detach(), m.mask, s)
        g = layer_value(granularity, name, layer_kind(m))
        apply_threshold(m, out[name], zero_weights=not surgery, granularity=g)
        if surgery:
            m.splice = True
    return out


def prune_by_percentile(model, q, which="all", surgery=False, granularity="weight"):
    """Per layer: prune the q percent (float or per-layer dict) smallest surviving weights, or
    where granularity (a string or per-layer dict) is 'kernel' the weights of the smallest
    kernels (see magnitudes; a conv's kernels are all one size, so q percent of its kernels is q
    percent of its weights).
    surgery: keep the pruned weights and let the layers splice (as prune_dns)."""
    out = {}
    for name, m in masked_layers(model, which):
        g = layer_value(granularity, name, layer_kind(m))
        alive = magnitudes(m.weight.detach(), g)[m.mask.bool()]
        out[name] = percentile_threshold(alive, layer_value(q, name, layer_kind(m)))
        apply_threshold(m, out[name], zero_weights=not surgery, granularity=g)
        if surgery:
            m.splice = True
    return out


def prune_global(model, q, which="all"):
    """One threshold for all chosen layers: the q-th percentile (a float) of all their
    surviving magnitudes pooled, so layers with many small weights lose more of them."""
    layers = masked_layers(model, which)
    pooled = torch.cat([m.weight.detach()[m.mask.bool()].flatten() for _, m in layers])
    t = percentile_threshold(pooled, q)
    for _, m in layers:
        apply_threshold(m, t)
    return {name: t for name, _ in layers}


def erk_densities(model, alive, which="all"):
    """The Erdős-Rényi-kernel allocation (Evci et al. 2020 section 3, after Mocanu et al. 2018):
    each chosen layer keeps a density proportional to sum(weight shape) / number of weights (an
    fc's fan-in + fan-out, a conv's in + out channels + kernel height + width, over its weights),
    capped at 1, the factor set so that `alive` (0..1) of all their weights stay. Small layers
    stay dense and large ones go sparse, where a one-shot sensitivity scan would spread the
    cuts by what each layer loses before retraining. Returns {layer name: density}."""
    layers = masked_layers(model, which)
    size = {name: m.weight.numel() for name, m in layers}
    raw = {name: sum(m.weight.shape) / m.weight.numel() for name, m in layers}
    full = set()  # layers capped at density 1; the others share what they leave
    while True:
        free = [n for n in raw if n not in full]
        left = alive * sum(size.values()) - sum(size[n] for n in full)
        if not free or left <= 0:
            break
        scale = left / sum(raw[n] * size[n] for n in free)
        capped = {n for n in free if scale * raw[n] > 1}
        if not capped:
            return {n: 1.0 if n in full else scale * raw[n] for n in raw}
        full |= capped
    return {n: 1.0 if n in full else 0.0 for n in raw}


def prune_dns(model, sensitivity, which="all", granularity="weight"):
    """Start dynamic network surgery (Guo et al. 2016): prune_by_std's thresholds and masks,
    but the weights are kept and the layers splice (see masked_weight) until finish_surgery.
    Returns {layer name: t}."""
    return prune_by_std(model, sensitivity, which, surgery=True, granularity=granularity)


def surgery_step(model, thresholds, band=0.1, sensitivities=None, densities=None, granularity="weight"):
    """One mask update of dynamic network surgery (Guo et al. 2016 eq. 3, with their
    hysteresis): a weight whose magnitude falls below (1 - band) t is pruned, one that rises
    above (1 + band) t is spliced back, one in between keeps its state. The band stops weights
    near the threshold from flickering in and out. thresholds: {layer name: t}.

    sensitivities: {layer name: s} to re-derive each t as s x the std of the layer's weights
    (all of them: surgery keeps the pruned ones) before the update, written back into
    `thresholds`. Behind a batch-norm a conv's weight scale is free, and with fixed thresholds
    a growing scale splices weights back (ResNet-20: 17.8% alive at the start, 28.4% after);
    a threshold that follows the scale keeps the density the sensitivity set, on average.

    densities: {layer name: fraction of weights kept} to re-derive each t instead as the
    magnitude that keeps that fraction of the layer's weights (those above it, before the
    band): the layer's density is held, and surgery only chooses which weights hold it. A
    loss whose gradients reshape the weight distribution (distillation) moves the density
    that a std rule gives; this does not.

    granularity (a string or per-layer dict): where 'kernel' (or a number n, an fc row's inputs
    in runs of n), a conv's kernels are ranked, pruned and spliced whole by their root mean
    square (see magnitudes), the threshold being on that."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        if sensitivities is not None:
            for name in thresholds:
                thresholds[name] = layers[name].weight.std() * sensitivities[name]  # a tensor: no GPU wait
        mags = {name: magnitudes(layers[name].weight, layer_value(granularity, name, layer_kind(layers[name])))
                for name in thresholds}
        if densities is not None:
            for name in thresholds:
                a = mags[name].flatten()
                n, keep = a.numel(), round(densities[name] * a.numel())
                if keep == 0 or keep == n:  # nothing kept: no magnitude passes; all kept: all pass
                    thresholds[name] = a.new_tensor(float("inf") if keep == 0 else 0.0)
                else:  # halfway between the largest magnitude dropped and the smallest kept
                    thresholds[name] = (a.kthvalue(n - keep).values + a.kthvalue(n - keep + 1).values) / 2
        for name, t in thresholds.items():
            m, a = layers[name], mags[name]
            m.mask.copy_(torch.where(a < (1 - band) * t, 0.0, torch.where(a > (1 + band) * t, 1.0, m.mask)))


def ramped(densities, step, steps):
    """Gradual pruning's schedule (Zhu & Gupta 2017): each layer's density falls from 1 to
    its target d over `steps` steps as d + (1 - d)(1 - step / steps)^3, fast while the
    network has weights to spare and slowly near the end, then stays at d. densities:
    {layer name: d}. Returns {layer name: density at this step}."""
    left = max(0.0, 1.0 - step / steps) ** 3 if steps > 0 else 0.0
    return {name: d + (1.0 - d) * left for name, d in densities.items()}


class GradualSurgery:
    """surgery_step with held densities that follow `ramped`: from 100% down to `densities`
    ({layer name: d}) over `steps` steps (0: the targets from the first step). Called with no
    arguments after every optimizer step (training.fit's after_step); state_dict holds the
    steps taken, so that a resumed phase goes on where it stopped. granularity: surgery_step's."""

    def __init__(self, model, thresholds, band, densities, steps, granularity="weight"):
        self.model, self.thresholds, self.band, self.densities, self.steps = model, thresholds, band, densities, steps
        self.granularity, self.step = granularity, 0

    def __call__(self):
        self.step += 1
        surgery_step(self.model, self.thresholds, self.band, None, ramped(self.densities, self.step, self.steps),
                     self.granularity)

    def state_dict(self):
        return dict(step=self.step)

    def load_state_dict(self, state):
        self.step = int(state["step"])


def finish_surgery(model):
    """End dynamic network surgery: zero the weights the masks prune (the outputs do not
    change) and stop splicing, so from here on pruned weights stay exactly 0."""
    for _, m in masked_layers(model):
        with torch.no_grad():
            m.weight.mul_(m.mask)
        m.splice = False


def group_lasso_penalty(model, strengths):
    """The group-lasso penalty (Yuan & Lin 2006; on network units, Wen et al. 2016) that pushes
    whole units of the chosen layers to zero, so that pruning takes them whole and their
    weights and positions cost nothing: for a layer of strength a,
        a x (sum over output units of sqrt(g) ||W[o]|| + sum over input units of sqrt(g') ||W[:, i]||),
    the norms taken over a unit's weights (an fc row or column, a conv filter or input channel:
    g and g' weights each) as the layer computes with them (weight * mask: pruned weights cost
    nothing). An input unit of LeNet-300-100's fc1 is a pixel: the norm over its 300 weights
    is what lets the border pixels go whole. In a grouped conv an input channel feeds its own
    group's filters only (a depthwise conv's one filter: its input and output units are the
    same weights). strengths: {layer name: a}; layers at 0 are left out. Returns a function of
    no arguments giving the penalty (a scalar tensor)."""
    layers = [(m, a) for name, m in masked_layers(model) if (a := strengths.get(name, 0.0)) > 0]

    def penalty():
        total = 0.0
        for m, a in layers:
            w = m.weight * m.mask
            rows, cols = w.flatten(1), input_units(w, getattr(m, "groups", 1))
            total = total + a * (rows.shape[1] ** 0.5 * torch.linalg.vector_norm(rows, dim=1).sum()
                                 + cols.shape[1] ** 0.5 * torch.linalg.vector_norm(cols, dim=1).sum())
        return total
    return penalty


def input_units(w, groups=1):
    """The weights of each input unit of a layer, a row per input channel (or fc input):
    w (out, in / groups, *kernel) -> (in, out / groups x kernel size). Input channel
    g x (in / groups) + j of a grouped conv is read by group g's filters only, at their place j."""
    out, per_group = w.shape[0], w.shape[1]
    w = w.reshape(groups, out // groups, per_group, -1)  # (group, filter in group, channel in group, kernel)
    return w.permute(0, 2, 1, 3).reshape(groups * per_group, -1)


# --- sparse variational dropout (Molchanov, Ashukha & Vetrov 2017) ---------------------------

LOG_ALPHA_RANGE = (-10.0, 10.0)  # log alpha is clipped here, as in the paper's code: past 10 a weight is
                                 # noise whatever its value, and the KL term's gradient there is ~0
VD_KL = (0.63576, 1.87320, 1.48695)  # k1, k2, k3 of the paper's fit of the KL term (eq. 14)
VD_INIT_LOG_SIGMA2 = -10.0       # every weight starts nearly deterministic: the trained network, noise-free


def log_alpha(layer):
    """log alpha = log sigma^2 - log theta^2 of each weight (the weight's shape), clipped to
    LOG_ALPHA_RANGE: alpha is the weight's noise-to-signal ratio, and a weight with a large
    alpha can be dropped without changing the expected output (Molchanov et al. section 4.3)."""
    return torch.clamp(layer.log_sigma2 - torch.log(layer.weight * layer.weight + 1e-8), *LOG_ALPHA_RANGE)


def variational_kl(log_a):
    """The KL divergence of each weight's posterior from the log-uniform prior (a tensor of
    log alpha -> the same shape), by the paper's approximation (eq. 14):
        KL = k1 - k1 sigmoid(k2 + k3 log alpha) + log(1 + 1/alpha) / 2,
    0 as alpha -> infinity (a dropped weight costs nothing) and large for a precise weight."""
    k1, k2, k3 = VD_KL
    return k1 - k1 * torch.sigmoid(k2 + k3 * log_a) + 0.5 * F.softplus(-log_a)


class VariationalDropout:
    """Pruning by sparse variational dropout (Molchanov et al. 2017): every chosen layer gets a
    `log_sigma2` parameter (its weight's shape, at VD_INIT_LOG_SIGMA2) and trains as a Gaussian
    posterior over its weights, the loss per example the cross-entropy plus `beta` x KL / n
    (the evidence lower bound for beta = 1, n the training images). The KL pulls alpha up on
    the weights the data do not need; those past `threshold` (log alpha) are pruned.

    Used as fit's after_step (the masks follow log alpha after every step, so evaluation sees
    the pruned network; the KL's weight rises linearly from 0 over `ramp_steps`, as in the
    paper's code, so that the network first fits under noise) and `penalty` (the KL term),
    with no weight decay (the KL is the prior of the weights and of log_sigma2).
    `finish` ends it: weights past the threshold zeroed, log_sigma2 removed. layers: [(name,
    masked layer)]."""

    def __init__(self, layers, threshold, beta, n, ramp_steps):
        self.layers, self.threshold, self.beta, self.n, self.ramp_steps = layers, threshold, beta, n, ramp_steps
        self.step = 0
        for _, m in layers:
            m.log_sigma2 = nn.Parameter(torch.full_like(m.weight, VD_INIT_LOG_SIGMA2))
            m.variational = True
        self.update_masks()

    def kl_weight(self):
        return self.beta * min(1.0, self.step / self.ramp_steps) if self.ramp_steps > 0 else self.beta

    def penalty(self):
        """beta x ramp x KL / n: the KL term's share of one example's loss (a scalar tensor)."""
        return self.kl_weight() / self.n * sum(variational_kl(log_alpha(m)).sum() for _, m in self.layers)

    def update_masks(self):
        with torch.no_grad():
            for _, m in self.layers:
                m.mask.copy_((log_alpha(m) < self.threshold).to(m.mask.dtype))

    def __call__(self):
        self.step += 1
        self.update_masks()

    def state_dict(self):
        return dict(step=self.step)

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.update_masks()

    def finish(self):
        """Prune the weights past the threshold (zeroed, as every pruned weight is) and turn the
        layers back into plain masked ones: the checkpoint holds no log_sigma2."""
        self.update_masks()
        for _, m in self.layers:
            with torch.no_grad():
                m.weight.mul_(m.mask)
            del m.log_sigma2
            m.variational = False


PRUNE_METHODS = {"std": prune_by_std, "percentile": prune_by_percentile, "global": prune_global,
                 "dns": prune_dns}


# --- units that compute nothing (structured pruning of what element-wise pruning left) ----------

def _zero(layer, where):
    """Prune the weights of `layer` where `where` (the weight's shape, bool) is True."""
    with torch.no_grad():
        layer.mask[where] = 0
        if hasattr(layer, "index"):  # a quantized layer (quantize.py): index 0 where pruned
            layer.index[where] = 0
        else:
            layer.weight[where] = 0


def drop_dead_units(model):
    """Remove, in place, the weights of units that cannot change the output, on a network whose
    masked layers form a chain (`model.chain`: [(layer, activation 'relu' | None)] in forward
    order, each layer's units read by the next one, channel-major after flattening).

    Pruning unit by unit's weights leaves whole units dead: LeNet-5's fc1 kept 500 neurons of
    which 311 had no input left and 370 fed nothing. Here
    1. a unit no weight of the next layer reads: its incoming weights are pruned (backwards, so
       that the units only it read follow);
    2. a unit with no incoming weight outputs the constant act(bias): the next layer's weights
       on it are folded into that layer's bias (bias += sum of those weights x the constant) and
       pruned, where the next layer is an fc or an unpadded conv (a padded conv sees the constant
       and the padding's zeros, which differ).
    3. a unit left with neither incoming weights nor a reader: its bias is set to 0, a value
       that codes in less than a bit where a bias table would spend its index (LeNet-5's fc1
       ends with 435 such of 500).
    The network computes the same function (to float32 rounding). Returns {'unread',
    'constant': units, 'weights': non-zeros pruned, 'biases': biases zeroed}, or None for a
    network without a chain."""
    chain = getattr(model, "chain", None)
    if chain is None:
        return None
    layers = dict(masked_layers(model))
    for name, _ in chain:  # a grouped conv's inputs are its group's units only, not the layer before's all
        if getattr(layers[name], "groups", 1) > 1:
            raise ValueError(f"the chain names {name}, a grouped conv: dead units are found on chains of "
                             "ungrouped layers only; leave it out of `chain` or set --drop_dead=False")
    alive = lambda m: (m.weight.detach() * m.mask) != 0  # noqa: E731
    fed = lambda A: alive(A).reshape(A.weight.shape[0], -1).any(1)  # noqa: E731  A's units with an input
    read = lambda A, B: alive(B).reshape(B.weight.shape[0], A.weight.shape[0], -1).any(2).any(0)  # noqa: E731
    before = sum(int(alive(layers[n]).sum()) for n, _ in chain)
    units = dict(unread=0, constant=0)
    for (a, _), (b, _) in reversed(list(zip(chain, chain[1:]))):
        A, B = layers[a], layers[b]
        unread = ~read(A, B) & fed(A)
        units["unread"] += int(unread.sum())
        _zero(A, unread.view(-1, *[1] * (A.weight.dim() - 1)).expand_as(A.weight))
    for (a, act), (b, _) in zip(chain, chain[1:]):
        A, B = layers[a], layers[b]
        if isinstance(B, nn.Conv2d) and any(B.padding) or B.bias is None:
            continue
        constant = ~fed(A) & read(A, B)
        if not constant.any():
            continue
        value = A.bias.detach()[constant] if A.bias is not None else torch.zeros(int(constant.sum()))
        value = F.relu(value) if act == "relu" else value
        w = (B.weight.detach() * B.mask).reshape(B.weight.shape[0], A.weight.shape[0], -1)
        with torch.no_grad():
            B.bias += (w[:, constant, :].sum(2) * value).sum(1)
        where = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        where[:, constant, :] = True
        _zero(B, where.reshape(B.weight.shape))
        units["constant"] += int(constant.sum())
    biases = 0
    for (a, _), (b, _) in zip(chain, chain[1:]):
        A, B = layers[a], layers[b]
        if A.bias is None:
            continue
        idle = ~read(A, B) & ~fed(A) & (A.bias.detach() != 0)
        with torch.no_grad():
            A.bias[idle] = 0
        biases += int(idle.sum())
    return {**units, "weights": before - sum(int(alive(layers[n]).sum()) for n, _ in chain), "biases": biases}
