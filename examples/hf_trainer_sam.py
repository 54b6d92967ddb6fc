"""A Hugging Face model trained with SAM through ``FlatTrainer``: the Trainer line changes.

A two-layer BERT built from a config (nothing downloaded) learns whether a token sequence holds
token 7, with the model's own loss, gradient accumulation and gradient clipping from
``TrainingArguments``. About 30 s on a CPU.

    python examples/hf_trainer_sam.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import flatminima as fm
from flatminima.integrations.hf import FlatTrainer


def sequences(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 50, (n, 12), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, 12, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 7
    ids[:, 0] = 1  # [CLS]
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    train, test = sequences(512, 0), sequences(256, 1)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=2,
            max_grad_norm=1.0, num_train_epochs=args.epochs, learning_rate=3e-3,
            report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
            logging_steps=20, seed=0)
        trainer = FlatTrainer(model=model, args=training, train_dataset=train,
                              flat_method=fm.SAM(rho=0.05))  # was: Trainer(...)
        trainer.train()
        logits = trainer.predict(test).predictions
    labels = torch.stack([t["labels"] for t in test])
    acc = float((torch.as_tensor(logits).argmax(1) == labels).float().mean())
    print(f"SAM in the Hugging Face Trainer: test acc {acc:.3f}")


if __name__ == "__main__":
    main()
