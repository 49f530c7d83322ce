"""Dice + cross-entropy that tolerates partially labelled cases (marginal loss).

MyoSegmenTUM labels multifidus and erector spinae only: a voxel marked 0 there is
"background, psoas or quadratus lumborum", not "background". Training on it with a plain
DiceCE loss would teach the network that psoas is background. We use the *marginal* loss
(Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ
segmentation", MedIA 2021): for a case, the softmax probabilities of the classes it does
not label are merged into the background channel before CE and Dice, so

* predicting psoas where the annotation says 0 costs nothing (psoas is inside the merged
  "background or unlabelled" class), while
* predicting psoas where the annotation says multifidus still costs (that voxel is surely
  not psoas), so the labelled classes keep full supervision and the unlabelled ones are
  still pushed out of labelled muscles.

Masking (ignoring every 0 voxel of such a case) would throw that second signal away and
also the true-background supervision; the marginal loss keeps both. For a fully labelled
case the merge is the identity and the loss equals MONAI's ``DiceCELoss(to_onehot_y=True,
softmax=True)`` with its defaults (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MarginalDiceCELoss(nn.Module):
    """Soft Dice + CE on class probabilities merged per sample.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        smooth_nr: Dice numerator smoothing (MONAI default 1e-5).
        smooth_dr: Dice denominator smoothing (MONAI default 1e-5).
        batch: Dice over the whole batch per class (as nnU-Net does) instead of per sample
            (MONAI's default). Per-sample Dice on 2D patches where a small muscle is absent
            or tiny is a noisy, near-binary signal; summing over the batch gives every
            class a well-defined Dice in almost every step.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 lambda_side_agnostic: float = 0.0, pairs: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8))):
        super().__init__()
        self.batch = batch
        # Side-agnostic term: the same Dice+CE on muscle *types* (right + left probabilities
        # summed). Left and right of a muscle look alike locally, so early in training their two
        # channels compete for the same voxels and one side can lose for good (observed: psoas
        # left and quadratus lumborum right never learned). The type term rewards both channels
        # on every voxel of the muscle, leaving only the side to the positional context.
        self.lambda_side_agnostic = lambda_side_agnostic
        self.pairs = pairs
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr

    @staticmethod
    def merged_log_probs(logits: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Log-probabilities with unlabelled classes folded into background.

        Args:
            logits: (B, C, *spatial) network output.
            labelled: (B, C) 1 where the sample's annotation covers the class, else 0.
        Returns:
            (B, C, *spatial): channel 0 = log(p_bg + sum of unlabelled p), unlabelled
            channels = -inf (probability 0), labelled channels unchanged.
        """
        log_probs = F.log_softmax(logits.float(), dim=1)
        view = (labelled.shape[0], labelled.shape[1]) + (1,) * (logits.ndim - 2)
        known = labelled.bool().clone()
        known[:, 0] = True  # background is always a (merged) class
        unknown = (~known).view(view)
        to_background = unknown.clone()
        to_background[:, 0] = True
        neg_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
        background = torch.logsumexp(torch.where(to_background, log_probs, neg_inf), dim=1, keepdim=True)
        others = torch.where(unknown[:, 1:], neg_inf, log_probs[:, 1:])
        return torch.cat([background, others], dim=1)

    def _dice_ce(self, merged: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Dice + CE of merged log-probabilities (B, C, ...) against class indices (B, ...)."""
        num_classes = merged.shape[1]
        present = F.one_hot(target, num_classes).movedim(-1, 1).to(merged.dtype)
        ce = F.nll_loss(merged, target)
        probs = merged.exp()
        dims = tuple(range(2, merged.ndim))
        intersection = (probs * present).sum(dims)  # (B, C)
        denominator = probs.sum(dims) + present.sum(dims)
        weights = known.to(probs.dtype)
        if self.batch:
            # A sample that does not label class c has p_c = 0 and no c voxels: it adds nothing
            # to the batch sums of c, so the marginal merge carries over unchanged.
            intersection, denominator = intersection.sum(0, keepdim=True), denominator.sum(0, keepdim=True)
            weights = weights.amax(0, keepdim=True)
        dice = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        # Unlabelled channels have p = 0 and no target, so their Dice term is constant;
        # they are left out of the mean rather than diluting it.
        dice_loss = (dice * weights).sum() / weights.sum()
        return self.lambda_dice * dice_loss + self.lambda_ce * ce

    def _types(self, merged: torch.Tensor, target: torch.Tensor, known: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge each (right, left) pair into one muscle-type channel (log-sum-exp of log-probs)."""
        channels = [merged[:, :1]]
        type_target = torch.zeros_like(target)
        type_known = [known[:, :1]]
        for index, (right, left) in enumerate(self.pairs, start=1):
            channels.append(torch.logsumexp(merged[:, [right, left]], dim=1, keepdim=True))
            type_target[(target == right) | (target == left)] = index
            type_known.append(known[:, right:right + 1] & known[:, left:left + 1])
        return torch.cat(channels, dim=1), type_target, torch.cat(type_known, dim=1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of ``logits`` (B, C, *spatial) against ``target`` (B, 1, *spatial) class indices.

        ``labelled`` (B, C) marks the classes each sample's annotation covers; None means all.
        A target voxel carrying a class its sample does not label is an error.
        """
        num_classes = logits.shape[1]
        if labelled is None:
            labelled = torch.ones(logits.shape[0], num_classes, device=logits.device)
        labelled = labelled.to(logits.device)
        target = target.long()
        if target.ndim == logits.ndim:
            target = target[:, 0]
        merged = self.merged_log_probs(logits, labelled)
        present = F.one_hot(target, num_classes).movedim(-1, 1).to(merged.dtype)
        known = labelled.bool().clone()
        known[:, 0] = True
        covered = (present * (~known).to(merged.dtype)[(...,) + (None,) * (logits.ndim - 2)]).sum()
        if covered > 0:
            raise ValueError("target contains a class that its sample marks as unlabelled")
        loss = self._dice_ce(merged, target, known)
        if self.lambda_side_agnostic > 0:
            loss = loss + self.lambda_side_agnostic * self._dice_ce(*self._types(merged, target, known))
        return loss
