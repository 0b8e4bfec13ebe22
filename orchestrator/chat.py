"""`rayft chat`: a conversation in the terminal with the base model plus adapters, streamed token by token.

It runs in the driver's own process (no Ray): one user, one model. `/clear` forgets the conversation,
`/exit` (or the end of input) ends it. Under a multimodal template `/image PATH` attaches an image to the next
message, where it stands as `<image>` (at the start, unless the message places its `<image>` itself).
"""

import sys
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from rayft.data.encode import encode_prompt
from rayft.data.media import IMAGE_PLACEHOLDER, expand_images, image_size, image_token_count
from rayft.data.pipeline import EncodingSettings
from rayft.recipe.config import RecipeConfig
from rayft.trainers.generate import generation_kwargs, stop_token_ids
from rayft.trainers.model import ImageModel, load_for_generation, load_tokenizer

COMMANDS = "/clear forgets the conversation, /exit ends the chat"
IMAGE_COMMAND = "/image PATH attaches an image to your next message"


def run_chat(cfg: RecipeConfig, stdin=sys.stdin, out=sys.stdout) -> None:
    """Reads user turns from `stdin` and streams each answer to `out`, keeping the conversation's history."""


    use_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(cfg.model)
    model = load_for_generation(cfg.model, use_gpu)
    template = EncodingSettings.of(cfg).chat_template()
    images = ImageModel.of(cfg, tokenizer)
    stops = stop_token_ids(tokenizer, cfg)
    settings = generation_kwargs(cfg.generating, stops, tokenizer.pad_token_id)
    torch.manual_seed(cfg.args.seed)
    adapters = f" with {cfg.model.adapter_name_or_path}" if cfg.model.adapter_name_or_path else ""
    commands = COMMANDS + (", " + IMAGE_COMMAND if images else "")
    out.write(f"[rayft] chatting with {cfg.model.model_name_or_path}{adapters}; {commands}\n")
    history: list[dict] = []
    seen: list[str] = []  # the conversation's images, in order
    pending: list[str] = []  # attached to the next message
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/clear":
            history, seen, pending = [], [], []
            out.write("[rayft] conversation cleared\n")
            continue
        if text.startswith("/image"):
            out.write(attach(text.removeprefix("/image").strip(), images, pending) + "\n")
            continue
        if not text:
            continue
        placed = text.count(IMAGE_PLACEHOLDER)
        if placed not in (0, len(pending)):
            out.write(f"[rayft] the message places {placed} {IMAGE_PLACEHOLDER} for {len(pending)} attached image(s); "
                      "place one per image, or none\n")
            continue
        if images is None and placed:
            out.write(f"[rayft] {IMAGE_PLACEHOLDER} needs a multimodal template; the text is sent as it is\n")
        content = text if placed or images is None else IMAGE_PLACEHOLDER * len(pending) + text
        turn = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        sources = seen + pending
        messages = history + turn
        if images is not None and sources:
            messages = expand_images(messages, [image_size(p) for p in sources], images.geometry,
                                     template.media_tokens)
        ids, cut = encode_prompt(template.encode_oneturn(tokenizer, {"messages": messages})[0],
                                 cfg.data.cutoff_len)
        if cut:
            out.write(f"[rayft] the conversation is longer than cutoff_len; its first {cut} tokens are left out\n")
        if cut and sources:
            out.write("[rayft] cutoff_len cuts into the conversation's images; /clear and start again\n")
            continue
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True,
                                        skip_special_tokens=cfg.generating.skip_special_tokens)
        input_ids = torch.tensor([ids], device=model.device)
        pixels = images.inputs(sources, input_ids) if images is not None else {}
        worker = Thread(target=model.generate, kwargs=dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **settings, **pixels))
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
        seen, pending = sources, []
    out.write("[rayft] bye\n")


def attach(path: str, images, pending: list[str]) -> str:
    """`/image PATH`: the image checked and kept for the next message; returns what the chat says."""
    if images is None:
        return "[rayft] images need a vision-language model under its multimodal template (e.g. qwen2_vl)"
    if not path:
        return f"[rayft] {IMAGE_COMMAND}"
    try:
        width, height = image_size(path)
    except (OSError, ValueError) as err:
        return f"[rayft] cannot read {path} ({' '.join(str(err).split())})"
    pending.append(path)
    return (f"[rayft] {path} ({width}x{height}, {image_token_count(width, height, images.geometry)} image tokens) "
            "goes with your next message")
