"""The model layer: presets, builders, checkpoints, the prompt format and the VLM families.

One job per file:

* :mod:`ddfm.model.presets` — the model presets, as data;
* :mod:`ddfm.model.build` — a preset's tokenizer and freshly initialised model;
* :mod:`ddfm.model.checkpoint` — Hugging Face checkpoint directories: ``ddfm.json``, save, load;
* :mod:`ddfm.model.chat` — the one prompt format (chat messages, templates, token ids, image expansion);
* :mod:`ddfm.model.families` — the VLM families as data (parts, processors, vision inputs, towers).

The ``init`` stage that writes the first checkpoint is :mod:`ddfm.init`.
"""

from ddfm.model.build import build_model
from ddfm.model.chat import encode_conversation, render_prompt, to_chat_messages
from ddfm.model.checkpoint import load_model, read_meta, save_checkpoint
from ddfm.model.families import FAMILIES, family_of
from ddfm.model.presets import PRESETS

__all__ = ["PRESETS", "build_model", "load_model", "read_meta", "save_checkpoint", "encode_conversation",
           "render_prompt", "to_chat_messages", "FAMILIES", "family_of"]
