"""Built-in end-to-end demos, one per main capability, each runnable on 2 CPU cores with no
downloads: `headwater demo <name>`."""

DEMOS = {
    "facts": ("headwater.demos.facts", "Fact tracing on a synthetic corpus: a tiny GPT-2, token-level gradients vs BM25."),
    "stages": ("headwater.demos.stages", "Training-stage attribution of a four-stage run recorded through the Hugging Face Trainer, vs retraining."),
}
