import numpy as np
import pandas as pd
import torch

from _synthetic import tiny_model
from truthmap.analyses.attention import attention_table


def test_hooks_read_the_last_tokens_attention_row_averaged_over_heads():
    lm = tiny_model()
    sequences = [[1, 5, 7, 9, 11, 3], [2, 3, 4, 8]]
    index = np.array([[0, 2, 5], [1, 3, -1]])
    weights = lm.attention_weights(sequences, index)  # [L, B, P]
    assert weights.shape == (2, 2, 3)
    lm.model.set_attn_implementation("eager")
    for b, seq in enumerate(sequences):
        with torch.no_grad():
            attentions = lm.model(torch.tensor([seq]), output_attentions=True).attentions
        for layer in range(2):
            row = attentions[layer][0, :, len(seq) - 1].mean(0)
            for p, i in enumerate(index[b]):
                if i >= 0:
                    assert abs(weights[layer, b, p] - row[i].item()) < 1e-5
    lm.model.set_attn_implementation("sdpa")


def test_implementation_is_restored_and_table_averages_valid_answers_only():
    lm = tiny_model()
    before = lm.model.config._attn_implementation
    answers = pd.DataFrame({"id": ["a", "b"], "pos_last_q": [1, 2], "pos_-1": [3, -1]})
    generations = pd.DataFrame({"id": ["a", "b"], "prompt_ids": [[1, 2], [3, 4, 5]], "answer_ids": [[6, 7], [8]]})
    table = attention_table(lm, answers, generations, ["last_q", "-1"])
    assert lm.model.config._attn_implementation == before
    assert list(table.columns) == ["layer", "position", "attention", "n"] and sorted(set(table.layer)) == [1, 2]
    assert table[table.position == "-1"].n.tolist() == [1, 1] and table[table.position == "last_q"].n.tolist() == [2, 2]
    assert ((table.attention > 0) & (table.attention <= 1)).all()
