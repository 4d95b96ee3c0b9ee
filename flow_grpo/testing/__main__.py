"""`python -m flow_grpo.testing OUT_DIR [--family sd3] [--geometry minimal]` saves a tiny pipeline."""

from flow_grpo.testing.pipelines import main

main()
