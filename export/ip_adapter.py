"""The IP-Adapter UNet variants: the UNet whose cross-attention layers also attend to image-prompt tokens.

One variant per set of adapter files and unit counts, never per image: the image prompt embeddings (the tokens the
adapter's image projection makes from a CLIP image embedding) are inputs of the component, and each adapter's
``to_k_ip`` / ``to_v_ip`` weights are part of it (baked, as the UNet's own weights are). The component name says
what it was made of::

    {base}+ip:{key}x{units}[,{key}x{units}...]      e.g.  unet+ip:1a2b3c4d5ex2,  unet_control_seamless+ip:...

``base`` is any UNet component (``unet``, ``unet_control`` and their seamless variants), ``key`` the adapter's
short hash and ``units`` how many ControlNet units use it. Inputs: the base component's, then per adapter ``a`` (in
the name's order) ``ip_tokens_a`` (B, units, tokens, cross_attention_dim) and ``ip_scale_a`` (B, units): each
row's tokens (conditional or unconditional) and weight (0 outside a unit's guidance window).

Every cross-attention layer (``attn2``) computes, as diffusers' ``IPAdapterAttnProcessor2_0``::

    out = softmax(q k_text^T / sqrt(d)) v_text + sum_units scale * softmax(q k_ip^T / sqrt(d)) v_ip

with ``k_ip = to_k_ip(tokens)``, ``v_ip = to_v_ip(tokens)``; the i-th cross-attention layer in the order of
``unet.attn_processors`` takes the adapter file's ``{2i+1}.to_k_ip`` / ``{2i+1}.to_v_ip`` (the h94 numbering, which
counts self- and cross-attention layers). The adapter modules travel in the backend's module dict under
``ip_adapter:{key}`` (:func:`module_key`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping, Sequence

IP_MARK = "+ip:"
_PART = re.compile(r"^([0-9a-zA-Z_-]+)x(\d+)$")


def module_key(key: str) -> str:
    """The backend module-dict key of the adapter ``key``."""
    return f"ip_adapter:{key}"


def variant_name(base: str, adapters: Sequence[tuple[str, int]]) -> str:
    """``{base}+ip:{key}x{units},...`` for ``adapters`` = [(key, units), ...]."""
    return base + IP_MARK + ",".join(f"{key}x{units}" for key, units in adapters)


def parse_variant(component: str) -> tuple[str, list[tuple[str, int]]]:
    """``(base, [(key, units), ...])`` of a variant name; ValueError when it is not one."""
    base, _, rest = component.partition(IP_MARK)
    parts = []
    for part in rest.split(","):
        m = _PART.match(part)
        if not m or int(m[2]) < 1:
            raise ValueError(f"bad IP-Adapter variant name {component!r}")
        parts.append((m[1], int(m[2])))
    if not base or not parts:
        raise ValueError(f"bad IP-Adapter variant name {component!r}")
    return base, parts


def is_variant(component: str) -> bool:
    return IP_MARK in component


def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention modules (``attn2``) in the order of ``unet.attn_processors``."""
    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            layers.append(modules[name[: -len(".processor")]])
    return layers


def adapter_module(ip_adapter: Mapping[str, Any], unet, tokens: int):
    """An ``nn.Module`` holding one adapter file's ``to_k_ip`` / ``to_v_ip`` per cross-attention layer of ``unet``
    (``ip_adapter``: the file's ``ip_adapter`` state dict); ValueError naming the first key that does not fit."""
    import torch
    from torch import nn

    layers = cross_attention_layers(unet)
    module = nn.Module()
    module.to_k_ip = nn.ModuleList()
    module.to_v_ip = nn.ModuleList()
    module.tokens = int(tokens)
    for i, attn in enumerate(layers):
        hidden = attn.to_k.out_features
        for name, target in (("to_k_ip", module.to_k_ip), ("to_v_ip", module.to_v_ip)):
            key = f"{2 * i + 1}.{name}.weight"
            if key not in ip_adapter:
                raise ValueError(f"no {key} for the UNet's cross-attention layer {i} of {len(layers)}")
            weight = ip_adapter[key]
            if tuple(weight.shape) != (hidden, attn.to_k.in_features):
                raise ValueError(f"{key} is {tuple(weight.shape)}, the UNet's layer needs "
                                 f"{(hidden, attn.to_k.in_features)}")
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(weight.float())
            target.append(linear)
    extra = len([k for k in ip_adapter if k.endswith(".to_k_ip.weight")]) - len(layers)
    if extra:
        raise ValueError(f"the adapter has {len(layers) + extra} cross-attention layers, the UNet {len(layers)}")
    return module.eval()


class IPAttnProcessor:
    """A cross-attention processor: diffusers' ``AttnProcessor2_0`` plus the image-prompt attention of every
    adapter in ``state`` (a list of ``(to_k_ip, to_v_ip, tokens (B, U, N, D), scale (B, U))``), set per call by
    :class:`IPAdapterUNet`."""

    def __init__(self, layer: int, state: list):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        length = query.shape[2]
        for to_k_ip, to_v_ip, tokens, scale in self.state:
            units, n_tokens = tokens.shape[1], tokens.shape[2]
            tokens = tokens.to(query.dtype)
            k_ip = to_k_ip[self.layer](tokens).view(batch_size, units, n_tokens, attn.heads, head_dim)
            v_ip = to_v_ip[self.layer](tokens).view(batch_size, units, n_tokens, attn.heads, head_dim)
            k_ip = k_ip.permute(0, 1, 3, 2, 4).reshape(batch_size * units, attn.heads, n_tokens, head_dim)
            v_ip = v_ip.permute(0, 1, 3, 2, 4).reshape(batch_size * units, attn.heads, n_tokens, head_dim)
            q = query.unsqueeze(1).expand(batch_size, units, attn.heads, length, head_dim)
            q = q.reshape(batch_size * units, attn.heads, length, head_dim)
            ip = F.scaled_dot_product_attention(q, k_ip, v_ip, attn_mask=None, dropout_p=0.0, is_causal=False)
            ip = ip.view(batch_size, units, attn.heads, length, head_dim)
            ip = (ip * scale.to(ip.dtype).view(batch_size, units, 1, 1, 1)).sum(dim=1)
            out = out + ip.transpose(1, 2).reshape(batch_size, length, attn.heads * head_dim)
        hidden_states = attn.to_out[0](out)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _wrapper_class():
    from torch import nn

    class IPAdapterUNet(nn.Module):
        """The base component's wrapper with :class:`IPAttnProcessor` on the UNet's cross-attention layers while
        it runs (restored after each call: the plain components share the module)."""

        def __init__(self, inner, unet, adapters, n_inputs: int):
            super().__init__()
            self.inner = inner
            self.adapters = nn.ModuleList(adapters)
            self.n_inputs = n_inputs
            self._unet = [unet]  # not a submodule: the inner wrapper holds it

        def forward(self, *args):
            base, rest = args[: self.n_inputs], args[self.n_inputs:]
            state = [(a.to_k_ip, a.to_v_ip, rest[2 * i], rest[2 * i + 1]) for i, a in enumerate(self.adapters)]
            layers = cross_attention_layers(self._unet[0])
            previous = [attn.processor for attn in layers]
            for i, attn in enumerate(layers):
                attn.processor = IPAttnProcessor(i, state)
            try:
                return self.inner(*base)
            finally:
                for attn, processor in zip(layers, previous):
                    attn.processor = processor

    return IPAdapterUNet


def describe_variant(component: str, modules: Mapping[str, Any], base_describe):
    """The descriptor of an IP-Adapter variant (``base_describe(base, modules)`` gives the base component's)."""
    from core.errors import InvalidRequest

    base, adapters = parse_variant(component)
    desc = base_describe(base, modules)
    missing = [key for key, _ in adapters if module_key(key) not in modules]
    if missing:
        raise InvalidRequest("component", f"no IP-Adapter {missing[0]!r} attached for {component!r}",
                             "attach the adapter module first (engine.ip_adapter)")
    unet = modules[desc.source]
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = list(desc.inputs)
    for i, (key, units) in enumerate(adapters):
        tokens = modules[module_key(key)].tokens
        spec = desc.inputs[0]  # a TensorSpec (export.descriptors imports this module: no import back)
        inputs += [replace(spec, name=f"ip_tokens_{i}", shape=("B", units, tokens, cross), dtype="float32",
                           value_range=(-1.0, 1.0)),
                   replace(spec, name=f"ip_scale_{i}", shape=("B", units), dtype="float32", value_range=(0.0, 1.0))]
    n_inputs = len(desc.inputs)
    weights = [modules[module_key(key)] for key, _ in adapters]

    def make(module, make_base=desc.make_wrapper):
        first = next(module.parameters())
        for w in weights:
            w.to(device=first.device, dtype=first.dtype)
        return _wrapper_class()(make_base(module), module, weights, n_inputs)

    return replace(desc, component=component, inputs=tuple(inputs), make_wrapper=make)
