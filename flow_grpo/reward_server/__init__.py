"""The reward server and its scorers (GenEval, OCR, VLM judge); training never imports this package.

`server` hosts scorers behind the JSON protocol of :mod:`flow_grpo.rewards.remote`;
`scripts/reward_server.py` is its command line.
"""
