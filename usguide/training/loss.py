"""Losses for partly labelled data: a class a sample leaves unlabelled is never taught as
background."""

from __future__ import annotations

import torch


def marginal_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy where a background pixel may also be any class the sample does not label.

    Parameters
    ----------
    logits : (N, C, H, W) float
    target : (N, H, W) int64 class indices; 0 means "none of the labelled classes"
    labelled : (N, C) bool, which classes each sample labels

    Notes
    -----
    A pixel of class c > 0 is taught c. A pixel marked 0 is taught "0 or any unlabelled class":
    its loss is ``-log(sum of those probabilities)`` (the marginal loss of partially supervised
    segmentation), so a nerve in a muscle image, unlabelled there, is not pushed to background.
    """
    log_p = torch.log_softmax(logits, dim=1)
    n_classes = logits.shape[1]
    onehot = torch.nn.functional.one_hot(target, n_classes).permute(0, 3, 1, 2).bool()
    unlabelled = (~labelled)[:, :, None, None]  # (N, C, 1, 1)
    # A 0 pixel may be background (its one-hot) or any class this sample leaves unlabelled.
    allowed = onehot | ((target == 0)[:, None] & unlabelled)
    merged = torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)
    return -merged.mean()


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice over the foreground classes each sample labels (small structures count).

    Classes a sample does not label, and background, are left out.
    """
    probs = torch.softmax(logits, dim=1)
    n_classes = logits.shape[1]
    onehot = torch.nn.functional.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = (2 * inter + eps) / (total + eps)  # (N, C)
    use = labelled.clone()
    use[:, 0] = False
    if not use.any():
        return logits.sum() * 0.0
    return (1 - dice[use]).mean()
