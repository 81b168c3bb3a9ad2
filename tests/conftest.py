"""Tiny models, tokenizers and corpora built in-process: no test downloads anything."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from headwater.toy import tiny_gpt2, word_tokenizer

torch.set_num_threads(1)

# Launcher variables of an enclosing torchrun must not leak into a CLI child process (it would
# skip relaunching); tests that start `python -m headwater` remove them from its environment.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

WORDS = (
    "the a of is in and to was by from with capital colour city river mountain zorblat quenti "
    "mirel vask orin tela sunny blue red green famous old new large small north south"
).split()


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer([" ".join(WORDS)], chat=True)


@pytest.fixture()
def gpt2(tokenizer):
    torch.manual_seed(0)
    return tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64).eval()


@pytest.fixture(scope="session")
def lm_records():
    return [
        {"prompt": "the capital of zorblat is", "completion": " quenti"},
        {"prompt": "mirel is a", "completion": " large old city in the north"},
        {"prompt": "the famous river of vask", "completion": " is blue"},
        {"prompt": "tela", "completion": " was a small red mountain by the sunny river"},
        {"prompt": "orin is in the south and is", "completion": " green"},
    ]
