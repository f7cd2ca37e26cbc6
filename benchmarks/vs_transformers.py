"""Prefill and decode speed of gptoss and of transformers' GptOssForCausalLM on the same checkpoint.

    python benchmarks/vs_transformers.py --model DIR [--prompt-len 128] [--gen 16] [--threads 2]

Both in bf16 on the CPU. transformers dequantizes MXFP4 experts to bf16 when it loads (it has no CPU
MXFP4 path without extra kernels), so use a reduced-depth checkpoint (`gptoss make-checkpoint
--preset gpt-oss-20b --layers 2`) to keep it within memory.
"""

import argparse
import json
import time

import torch

from gptoss.generation.benchmark import decode_seconds, prefill_seconds
from gptoss.weights.checkpoint import load_model


@torch.inference_mode()
def transformers_speed(path, prompt_len: int, gen: int) -> tuple[float, float]:
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    model(ids[:, :16])  # warm up
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(gen):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prompt_len / prefill, gen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = load_model(args.model, dtype=torch.bfloat16)
    prefill_seconds(ours, 16, 128, seed=1)  # warm up
    seconds, (sequence, logits) = prefill_seconds(ours, args.prompt_len, 128, room=args.gen)
    ours_prefill, ours_decode = args.prompt_len / seconds, args.gen / decode_seconds(ours, sequence, logits, args.gen)
    del ours, cache
    hf_prefill, hf_decode = transformers_speed(args.model, args.prompt_len, args.gen)
    print(json.dumps({"gptoss": {"prefill_tok_s": ours_prefill, "decode_tok_s": ours_decode},
                      "transformers": {"prefill_tok_s": hf_prefill, "decode_tok_s": hf_decode},
                      "prefill_ratio": ours_prefill / hf_prefill, "decode_ratio": ours_decode / hf_decode}))


if __name__ == "__main__":
    main()
