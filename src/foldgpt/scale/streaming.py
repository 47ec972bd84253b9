"""Layer-by-layer streaming (the SparseGPT/GPTQ pattern): catch what the first layer receives, then run one
layer at a time on the device over the cached calibration activations, so peak device memory is about
one block plus activations, not the whole model.

Every decoder layer is first replaced by a catcher that records its call (hidden states and the keyword
arguments the model builds for it: masks, rotary embeddings, per layer kind) and passes its input through,
so one cheap pass of the model yields every layer's arguments; then the real layers are run in turn.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..stages.analysis import cosine_matrix_sums
from .placement import is_placed, placement_of, to_device


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, store: list, drop: tuple[str, ...]):
        super().__init__()
        self.layer = layer  # kept so attributes such as attention_type stay reachable
        self.store, self.drop = store, drop  # `drop`: the keyword arguments that carry the KV cache

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.drop}
        self.store.append((hidden_states.detach(), args, kwargs))
        return hidden_states


@contextmanager
def _catchers(model: nn.Module, adapter: Adapter):
    layers = adapter.layers(model)
    originals = list(layers)
    stores: list[list] = [[] for _ in originals]
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, stores[i], adapter.cache_kwargs)
    try:
        yield stores
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def layer_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """h_0 (the first layer's input) and, for every layer, the (args, kwargs) it is called with."""
    with _catchers(model, adapter) as stores:
        adapter.decoder(model)(input_ids=ids, use_cache=False)
    return stores[0][0][0], [(s[0][1], s[0][2]) for s in stores]


@torch.no_grad()
def streamed_hidden_states(model: nn.Module, adapter: Adapter, ids: torch.Tensor, device: str | torch.device,
                           offload: str | torch.device = "cpu"):
    """Yield (l, h_l) for l = 0..L, running one layer at a time on `device`. The model stays on `offload`
    except for the layer being run."""
    h, calls = layer_inputs(model, adapter, ids)
    yield 0, h
    h = h.to(device)
    for i, layer in enumerate(adapter.layers(model)):
        args, kwargs = calls[i]
        layer.to(device)
        out = layer(h, *to_device(list(args), device), **to_device(kwargs, device))
        h = out[0] if isinstance(out, tuple) else out
        layer.to(offload)
        yield i + 1, h.to(offload)


@torch.no_grad()
def streamed_similarity(model: nn.Module, adapter: Adapter, batches: torch.Tensor, skip_first: bool,
                        device: str | torch.device = "cpu", batch_size: int = 4) -> torch.Tensor:
    """The (L+1)x(L+1) mean-cosine matrix of `analysis.similarity`, computed layer by layer."""
    total, count = None, 0
    for i in range(0, len(batches), batch_size):
        ids = batches[i : i + batch_size]
        states = []
        for _, h in streamed_hidden_states(model, adapter, ids.to(model.device), device, model.device):
            states.append(h[:, 1:] if skip_first else h)
        s, n = cosine_matrix_sums(torch.stack(states).flatten(1, 2))
        total = s if total is None else total + s
        count += n
    return total / count


def _final_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The model's head on the last layer's output: final norm, output embedding, logit soft-capping."""
    logits = model.get_output_embeddings()(get_adapter(model.config).final_norm(model)(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class StreamedNLL:
    """Calibration NLL of the model under trial gates, computed layer by layer on `device` while the
    model stays on `offload` (SLEB / BlockPruner when the model does not fit on the device).

    A trial that differs from the current state only at layer l leaves the inputs of layers 0..l
    unchanged, so `refresh` caches every layer's input under the current gates once per greedy step and
    `nll` runs only layers l.. for a trial: about half the layer runs of a whole forward per trial."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, device: str | torch.device):
        self.model, self.adapter, self.device = model, adapter, torch.device(device)
        self.offload = next(model.parameters()).device
        where = placement_of(model)
        if where is not None:  # a placed model moves its layers' inputs and weights itself (--device-map)
            self.device, self.offload = torch.device(where.main), torch.device("cpu")
        self.ids = ids.to(next(model.parameters()).device)
        self.h0, self.calls = layer_inputs(model, adapter, self.ids)
        self.inputs: list[torch.Tensor] = []
        self._head_home = [next(m.parameters()).device for m in self._head()]
        for m in self._head():
            m.to(self.device)

    def _head(self) -> tuple[nn.Module, nn.Module]:
        return self.adapter.final_norm(self.model), self.model.get_output_embeddings()

    def close(self) -> None:
        for m, home in zip(self._head(), self._head_home):
            m.to(home)

    def _run(self, start: int, h: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        h = h.to(self.device)
        for i in range(start, len(self.calls)):
            if keep is not None:
                keep.append(h.to(self.offload))
            layer = self.adapter.layers(self.model)[i]
            args, kwargs = self.calls[i]
            args, kwargs = to_device(list(args), self.device), to_device(kwargs, self.device)
            if is_placed(layer):
                out = layer(h, *args, **kwargs)
            else:  # an unplaced model: the layer sits on the device only while it runs
                home = next(layer.parameters()).device
                layer.to(self.device)
                out = layer(h, *args, **kwargs)
                layer.to(home)
            h = out[0] if isinstance(out, tuple) else out
        return h

    @torch.no_grad()
    def refresh(self) -> torch.Tensor:
        """Cache every layer's input under the gates currently set on the model; returns the last layer's output."""
        self.inputs = []
        return self._run(0, self.h0, self.inputs)

    @torch.no_grad()
    def final(self, first_changed_layer: int) -> torch.Tensor:
        """The last layer's output with the gates currently set, reusing the cached inputs up to that layer."""
        return self._run(first_changed_layer, self.inputs[first_changed_layer])

    @torch.no_grad()
    def nll(self, first_changed_layer: int) -> float:
        """Mean next-token NLL with the gates currently set, reusing the cached inputs up to that layer."""
        h = self._run(first_changed_layer, self.inputs[first_changed_layer])
        logits = _final_logits(self.model, h)[:, :-1].float()
        target = self.ids[:, 1:].to(self.device)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).item()
