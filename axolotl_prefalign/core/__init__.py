"""The engine floor: no import of Axolotl, TRL or LLaMA-Factory.

`logprobs` (the fused lm_head + log-softmax + gather), `heads`, `losses`,
`preference` (the framework-neutral DPO step: batch layout, hidden states,
reference, SPA confidence and DND margin, loss, metrics), `rows` and `local_data`
(validation and local files with file/line errors), `shards` (atomic, resumable
outputs), `generation`, `models` (the embedded default model), `config` (the
`prefalign:` block).
"""
