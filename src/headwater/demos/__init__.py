"""Built-in end-to-end demos, one per main capability, each runnable on 2 CPU cores with no
downloads: `headwater demo <name>`."""

DEMOS = {
    "facts": ("headwater.demos.facts", "Fact tracing on a synthetic corpus: a tiny GPT-2, token-level gradients vs BM25."),
    "concepts": (
        "headwater.demos.concepts",
        "Which fine-tuning records taught a tiny GPT-2 a planted hostile tone: Concept Influence vs probe approximations, loss influence and BM25.",
    ),
    "corpus": (
        "headwater.demos.corpus",
        "Which topic × format bins of a generated corpus support two planted capabilities: the corpus map, a contrast, unlearning, an HTML report.",
    ),
    "stages": ("headwater.demos.stages", "Training-stage attribution of a four-stage run recorded through the Hugging Face Trainer, vs retraining."),
}


class CachedConfig:
    """Mixin of the demos' size dataclasses: `key()` hashes the settings to name cached models,
    and whether they were trained with portable kernels (`headwater demo --portable`), so that a
    model trained with a CPU's own kernels is not reused as a portable one."""

    def key(self) -> str:
        import dataclasses
        import hashlib
        import json
        import os

        settings = {**dataclasses.asdict(self), "portable": os.environ.get("HEADWATER_PORTABLE_KERNELS") == "1"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
