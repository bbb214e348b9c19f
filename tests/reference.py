"""The official KaLM-Reranker-V1 recipe written with plain transformers calls, one pair at a time.

This is the independent reference the engine is checked against: it shares no code with kalm_rag
(template, truncation and pooling are written out here again, following FBNL_SPEC.md).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
INSTRUCTION = "Given a query, retrieve documents that answer the query."


def official_margin(
    model,
    tokenizer,
    query: str,
    passage: str,
    *,
    ratio: int,
    instruction: str = INSTRUCTION,
    system: str = SYSTEM,
    max_query_tokens: int = 512,
    max_passage_tokens: int = 1024,
) -> float:
    """z_yes - z_no for one (query, passage) pair: no batching, no cache, full LM-head logits."""
    with torch.no_grad():
        enc = tokenizer(
            "<Document>: " + passage,
            add_special_tokens=False,
            truncation=True,
            max_length=max_passage_tokens,
            return_tensors="pt",
        )
        states = model.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        n = states.shape[1]
        windows = [states[0, start : start + ratio].mean(dim=0) for start in range(0, n, ratio)]
        pooled = torch.stack(windows).unsqueeze(0)  # (1, ceil(n/r), d)

        q_ids = tokenizer.encode(query, add_special_tokens=False)[:max_query_tokens]
        q_text = tokenizer.decode(q_ids, clean_up_tokenization_spaces=False)
        prompt = (
            f"<bos><start_of_turn>user\n{system}\n\n<Instruct>: {instruction}\n<Query>: {q_text}<end_of_turn>\n"
            "<start_of_turn>model\n\n\n\n"
        )
        dec = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
            attention_mask=torch.ones(1, pooled.shape[1], dtype=torch.long),
            decoder_input_ids=dec.input_ids,
            use_cache=False,
        )
        logits = out.logits[0, -1].float()
        yes = tokenizer.convert_tokens_to_ids("yes")
        no = tokenizer.convert_tokens_to_ids("no")
        return float(logits[yes] - logits[no])
