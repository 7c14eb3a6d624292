"""Makes the pre-trained model of the chapter "Pre-training" at its default settings, if missing.

    python scripts/pretrained_model.py

``make nbval`` runs this first, beside the chapters that do not need the model, so that the
chapters that load it (6-11) find it. It trains exactly as chapter 5 does: the same function
(``pretrained.pretrain`` through ``pretrained_model``), the same settings (``PretrainSettings()``,
which chapter 5 checks are its own), and one thread, chapter 5's ``num_threads``, so the weights
are the same bits. Prints the run folder.
"""

import torch

from llm_from_scratch.pretrained import PretrainSettings, pretrained_model

if __name__ == "__main__":
    torch.set_num_threads(1)
    print(pretrained_model(PretrainSettings()).run_dir)
