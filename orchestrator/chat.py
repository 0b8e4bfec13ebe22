"""`rayft chat`: a conversation in the terminal with the base model plus adapters, streamed token by token.

It runs in the driver's own process (no Ray): one user, one model. `/clear` forgets the conversation,
`/exit` (or the end of input) ends it.
"""

import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from rayft.data.encode import encode_prompt
from rayft.data.pipeline import EncodingSettings
from rayft.recipe.config import RecipeConfig
from rayft.trainers.generate import generation_kwargs, stop_token_ids
from rayft.trainers.model import load_for_generation, load_tokenizer

COMMANDS = "/clear forgets the conversation, /exit ends the chat"


def run_chat(cfg: RecipeConfig, stdin=sys.stdin, out=sys.stdout) -> None:
    """Reads user turns from `stdin` and streams each answer to `out`, keeping the conversation's history."""


    use_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(cfg.model)
    model = load_for_generation(cfg.model, use_gpu)
    template = EncodingSettings.of(cfg).chat_template()
    stops = stop_token_ids(tokenizer, cfg)
    settings = generation_kwargs(cfg.generating, stops, tokenizer.pad_token_id)
    torch.manual_seed(cfg.args.seed)
    adapters = f" with {cfg.model.adapter_name_or_path}" if cfg.model.adapter_name_or_path else ""
    out.write(f"[rayft] chatting with {cfg.model.model_name_or_path}{adapters}; {COMMANDS}\n")
    history: list[dict] = []
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/clear":
            history = []
            out.write("[rayft] conversation cleared\n")
            continue
        if not text:
            continue
        turn = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        ids, cut = encode_prompt(template.encode_oneturn(tokenizer, {"messages": history + turn})[0],
                                 cfg.data.cutoff_len)
        if cut:
            out.write(f"[rayft] the conversation is longer than cutoff_len; its first {cut} tokens are left out\n")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True,
                                        skip_special_tokens=cfg.generating.skip_special_tokens)
        input_ids = torch.tensor([ids], device=model.device)
        worker = Thread(target=model.generate, kwargs=dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **settings))
        worker.start()
        out.write("Assistant: ")
        answer = ""
        for piece in streamer:
            out.write(piece)
            out.flush()
            answer += piece
        worker.join()
        out.write("\n")
        history += [turn[0], {"role": "assistant", "content": answer.strip()}]
    out.write("[rayft] bye\n")
