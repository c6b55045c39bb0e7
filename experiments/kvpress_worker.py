"""NVIDIA kvpress side of `bench_kvpress.py`; runs in the kvpress venv (torch, transformers < 5.3, kvpress), never
in the project venv, and imports nothing from lkv_jax.

    .venv-kvpress/bin/python experiments/kvpress_worker.py MODEL_DIR --threads 2

Loads the Hugging Face directory MODEL_DIR (float32; sdpa, and eager for ObservedAttention, which needs the
attention weights) and answers one JSON request per stdin line with one JSON line on stdout, so the parent can
alternate kvpress and lkv_jax runs without reloading the model:

    {"op": "hello"}                                  versions, thread count, loading report
    {"op": "prompt", "ids": [...]}                   set the prompt (one row of token ids)
    {"op": "time", "press": NAME, "ratio": R}        seconds of one pipeline prefill + press on the prompt
    {"op": "kept", "press": NAME, "ratio": R}        per layer the kept indices [K][n_kept] (ascending) and
                                                     kvpress's scores [K][S]
    {"op": "quit"}

The timed call is kvpress's own pipeline prefill step (`KVPressTextGenerationPipeline._forward`): the press as a
context manager around `model.model(input_ids=..., past_key_values=DynamicCache())`, no LM head, under
`torch.inference_mode()`. Errors come back as {"error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

PRESS_CLASSES = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "tova": "TOVAPress",
                 "knorm": "KnormPress", "observed-attention": "ObservedAttentionPress"}
EAGER = frozenset({"observed-attention"})  # presses that read the attention weights


class Worker:
    """The loaded models (one per attention implementation, loaded on first use) and the current prompt."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.models = {}
        self.ids = None
        self.loading = {}

    def model(self, attn: str):
        import torch
        from transformers import LlamaForCausalLM

        if attn not in self.models:
            m, info = LlamaForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation=attn,
                                                       output_loading_info=True)
            # a missing or unexpected tensor would silently leave random weights: refuse
            bad = {k: sorted(map(str, v)) for k, v in info.items() if v}
            if bad:
                raise RuntimeError(f"{self.model_dir} does not load cleanly: {bad}")
            self.models[attn] = m.eval()
        return self.models[attn]

    def press(self, name: str, ratio: float):
        import kvpress

        return getattr(kvpress, PRESS_CLASSES[name])(compression_ratio=ratio)

    def prefill(self, press, attn: str):
        """kvpress's pipeline prefill step; returns the DynamicCache."""
        import torch
        from transformers import DynamicCache

        model = self.model(attn)
        cache = DynamicCache()
        with torch.inference_mode(), press(model):
            model.model(input_ids=self.ids, past_key_values=cache)
        return cache

    def handle(self, req: dict) -> dict:
        import torch

        op = req["op"]
        if op == "hello":
            import kvpress
            import transformers

            return dict(torch=torch.__version__, transformers=transformers.__version__,
                        kvpress=getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
                        threads=torch.get_num_threads())
        if op == "prompt":
            self.ids = torch.tensor([req["ids"]], dtype=torch.long)
            return dict(tokens=int(self.ids.shape[1]))
        if self.ids is None:
            raise RuntimeError("no prompt: send {'op': 'prompt', 'ids': [...]} first")
        name, ratio = req["press"], float(req["ratio"])
        attn = "eager" if name in EAGER else "sdpa"
        if op == "time":
            press = self.press(name, ratio)
            self.model(attn)  # loading is not timed
            t0 = time.perf_counter()
            cache = self.prefill(press, attn)
            seconds = time.perf_counter() - t0
            return dict(seconds=seconds, n_kept=int(cache.get_seq_length()))
        if op == "kept":
            return self.kept(name, ratio, attn)
        raise ValueError(f"unknown op {op!r}")

    def kept(self, name: str, ratio: float, attn: str) -> dict:
        """Run the press once, recording each layer's scores and keys as kvpress's ScorerPress.compress sees
        them; the kept indices are its own top-k of those scores, checked against the compressed cache."""
        import torch
        from kvpress.utils import compute_n_kept

        press = self.press(name, ratio)
        seen = {}
        score = press.score

        def recording_score(module, hidden_states, keys, values, attentions, kwargs):
            s = score(module, hidden_states, keys, values, attentions, kwargs)
            seen[module.layer_idx] = (s.detach().clone(), keys.detach().clone())
            return s

        press.score = recording_score  # instance attribute: ScorerPress.compress calls self.score
        cache = self.prefill(press, attn)
        indices, scores = [], []
        for layer in range(len(cache.layers)):
            s, keys = seen[layer]
            n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
            idx = s.topk(n_kept, dim=-1).indices  # what ScorerPress.compress keeps
            gathered = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            if not torch.equal(gathered, cache.layers[layer].keys):
                raise RuntimeError(f"layer {layer}: the recorded top-k is not what kvpress kept")
            indices.append(idx.sort(dim=-1).values[0].tolist())
            scores.append(s[0].float().tolist())
        return dict(indices=indices, scores=scores)


def _dist_version(name: str):
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    # no loading bars or advisory warnings on the parent's terminal
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # replies go to the real stdout; anything a library prints goes to stderr so it cannot break the protocol
    reply_to = sys.stdout
    sys.stdout = sys.stderr
    worker = Worker(args.model_dir)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            out = worker.handle(req)
        except Exception as e:  # the parent reports it; the worker stays up for the next request
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        reply_to.write(json.dumps(out) + "\n")
        reply_to.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
