"""Hungarian matching and the mask-classification loss (Mask2Former's, as trained in EoMT).

Mask terms are evaluated on sampled points instead of full masks: the matcher uses uniform random
points shared by every prediction and target of an image, the loss uses points concentrated where
each matched prediction is least certain. Everything is computed in float32.

Video (VidEoMT): predictions (B, T, K, h, w) and (B, T, K, C+1) per clip, targets of tracks,
masks (N, T, H, W). A query is matched to a track once for the whole clip, then every frame is
supervised as an image of its own (the track's mask in that frame, empty where it is absent,
and its class in every frame), as the authors' online model is trained. How the match is made
is `video_matching`: "first_frame" (the authors' VideoHungarianMatcher_Consistent, which their
online model uses: each track is matched on the frame where it first appears, tracks first
appearing later only to queries not yet taken) or "clip" (their VideoHungarianMatcher: one
cost over all frames, the same points in every frame, class probabilities averaged over them).
Tracks without a pixel in the clip are left out, as their prepare_targets does.
"""

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample float maps (M, H, W) at points (x, y) in [0, 1]^2.

    `points` is (P, 2), shared by all maps, or (M, P, 2), one set per map; returns (M, P).
    Points in the outer half-pixel band take the edge pixel's value (border padding) instead of
    being blended with an imaginary zero pixel, so a mask that fills the image stays 1 at its edge.
    """
    grid = 2.0 * points - 1.0
    if points.dim() == 2:
        # One grid for every map, expanded, not copied: one map per batch item samples the same
        # values several times faster on the CPU than the maps as channels of one input.
        grid = grid.expand(maps.shape[0], -1, -1)
    sampled = F.grid_sample(
        maps.unsqueeze(1),
        grid.unsqueeze(1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled.view(maps.shape[0], points.shape[-2])


def sample_uncertain_points(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Per-mask points (M, num_points, 2) for mask logits (M, h, w), most of them where |logit|
    is smallest among oversample_ratio * num_points uniform candidates, the rest uniform."""
    num_masks = mask_logits.shape[0]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = torch.rand(
        num_masks, int(oversample_ratio * num_points), 2, device=mask_logits.device
    )
    uncertainty = -point_sample(mask_logits, candidates).abs()
    most_uncertain = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices
    uncertain_points = candidates.gather(1, most_uncertain.unsqueeze(-1).expand(-1, -1, 2))
    random_points = torch.rand(num_masks, num_random, 2, device=mask_logits.device)
    return torch.cat([uncertain_points, random_points], dim=1)


def sigmoid_bce_cost(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points for every pair: logits (K, P), targets (N, P) -> (K, N)."""
    # BCE(x, t) = -t * log(sigmoid(x)) - (1 - t) * log(1 - sigmoid(x)) is linear in t, so two
    # matmuls give all pairs; log(1 - sigmoid(x)) = log(sigmoid(x)) - x.
    log_prob = F.logsigmoid(point_logits)
    positive = log_prob @ point_targets.T
    # In place: a (K, P) temporary fewer, each of which page-faults anew on the CPU.
    negative = log_prob.sub_(point_logits) @ (1.0 - point_targets).T
    return (-positive - negative) / point_logits.shape[1]


def dice_cost(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """Soft dice loss (+1 smoothed) for every pair: logits (K, P), targets (N, P) -> (K, N)."""
    probs = point_logits.sigmoid()
    intersection = probs @ point_targets.T
    sizes = probs.sum(1)[:, None] + point_targets.sum(1)[None, :]
    return 1.0 - (2.0 * intersection + 1.0) / (sizes + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments minimising class + mask cost."""

    def __init__(
        self,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    def cost_matrix(
        self,
        mask_logits: Tensor,
        class_logits: Tensor,
        target_masks: Tensor,
        target_labels: Tensor,
        points: Tensor,
    ) -> Tensor:
        """Cost (K, N) of one image: mask_logits (K, h, w), class_logits (K, C+1),
        target_masks (N, H, W), target_labels (N,), points (P, 2) shared by all of them."""
        class_cost = -class_logits.float().softmax(-1)[:, target_labels]
        point_logits = point_sample(mask_logits.float(), points)
        point_targets = point_sample(target_masks.float(), points)
        return (
            self.class_weight * class_cost
            + self.mask_weight * sigmoid_bce_cost(point_logits, point_targets)
            + self.dice_weight * dice_cost(point_logits, point_targets)
        )

    @torch.no_grad()
    def forward(
        self, mask_logits: Tensor, class_logits: Tensor, targets: list[dict]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match mask_logits (B, K, h, w) and class_logits (B, K, C+1) to targets (per image, a
        dict with `masks` (N, H, W) and `labels` (N,)). Returns per image (query_idx, target_idx),
        int64 tensors on the CPU, empty for an image without targets."""
        indices = []
        for image_mask_logits, image_class_logits, target in zip(
            mask_logits, class_logits, targets
        ):
            query_idx, target_idx = [], []
            if target["labels"].numel() > 0:
                points = torch.rand(self.num_points, 2, device=mask_logits.device)
                cost = self.cost_matrix(
                    image_mask_logits, image_class_logits, target["masks"], target["labels"], points
                )
                query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices

    @torch.no_grad()
    def match_clips(
        self, mask_logits: Tensor, class_logits: Tensor, targets: list[dict], mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        """Match mask_logits (B, T, K, h, w) and class_logits (B, T, K, C+1) to tracks (per
        clip `masks` (N, T, H, W), `labels` (N,), each present in some frame), one match per
        clip for all its frames (see the module docstring for `mode`)."""
        if mode not in VIDEO_MATCHING:
            raise ValueError(f"video matching must be one of {VIDEO_MATCHING}, got {mode!r}")
        indices = []
        for clip_masks, clip_classes, target in zip(mask_logits, class_logits, targets):
            query_idx, target_idx = [], []
            if target["labels"].numel() > 0:
                match = self._match_clip if mode == "clip" else self._match_first_frames
                query_idx, target_idx = match(clip_masks, clip_classes, target)
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices

    def clip_cost_matrix(
        self,
        mask_logits: Tensor,
        class_logits: Tensor,
        target_masks: Tensor,
        target_labels: Tensor,
        points: Tensor,
    ) -> Tensor:
        """Cost (K, N) of one clip: mask_logits (T, K, h, w), class_logits (T, K, C+1),
        target_masks (N, T, H, W), target_labels (N,), points (P, 2) used in every frame:
        BCE and dice over all T x P points, class probabilities averaged over frames."""
        frames, queries = mask_logits.shape[:2]
        num_points = points.shape[0]
        # (T, K, h, w) -> (K, T * P): a query's points over the clip, frame after frame.
        point_logits = point_sample(mask_logits.float().transpose(0, 1).flatten(0, 1), points)
        point_logits = point_logits.view(queries, frames * num_points)
        point_targets = point_sample(target_masks.float().flatten(0, 1), points)
        point_targets = point_targets.view(target_masks.shape[0], frames * num_points)
        class_cost = -class_logits.float().softmax(-1).mean(0)[:, target_labels]
        return (
            self.class_weight * class_cost
            + self.mask_weight * sigmoid_bce_cost(point_logits, point_targets)
            + self.dice_weight * dice_cost(point_logits, point_targets)
        )

    def _match_clip(self, mask_logits: Tensor, class_logits: Tensor, target: dict):
        """One assignment from the cost over the whole clip (`clip_cost_matrix`)."""
        points = torch.rand(self.num_points, 2, device=mask_logits.device)
        cost = self.clip_cost_matrix(
            mask_logits, class_logits, target["masks"], target["labels"], points
        )
        return linear_sum_assignment(cost.cpu().numpy())

    def _match_first_frames(self, mask_logits: Tensor, class_logits: Tensor, target: dict):
        """Each track matched on the frame where it first appears, with that frame's prediction
        alone; frames in order, each to the queries earlier frames have not taken."""
        masks, labels = target["masks"], target["labels"]
        present = masks.flatten(2).any(2)  # (N, T)
        first = present.to(torch.uint8).argmax(1)  # the first frame with a pixel
        used: list[int] = []
        query_idx, target_idx = [], []
        for frame in first.unique().tolist():  # sorted
            tracks = (first == frame).nonzero().flatten()
            points = torch.rand(self.num_points, 2, device=mask_logits.device)
            frame_masks = masks[tracks, frame]
            cost = self.cost_matrix(
                mask_logits[frame], class_logits[frame], frame_masks, labels[tracks], points
            )
            cost[used] = TAKEN_COST
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            used += rows.tolist()
            query_idx += rows.tolist()
            target_idx += tracks.cpu()[cols].tolist()
        return query_idx, target_idx


# The cost of a query an earlier frame's tracks took (the authors' 1e6).
TAKEN_COST = 1e6
VIDEO_MATCHING = ("first_frame", "clip")


def present_tracks(target: dict) -> dict:
    """A clip's target without the tracks that have no pixel in any of its frames."""
    keep = target["masks"].flatten(1).any(1)
    if bool(keep.all()):
        return target
    return {**target, "masks": target["masks"][keep], "labels": target["labels"][keep]}


def count_masks(target: dict) -> int:
    """The masks a target adds to the loss's normaliser: an image's segments, or a clip's
    tracks present in it times its frames (each frame of a track is one mask)."""
    masks = target["masks"]
    if masks.dim() == 4:
        return int(masks.flatten(1).any(1).sum()) * masks.shape[1]
    return target["labels"].numel()


def class_weights(num_classes: int, no_object_weight: float) -> Tensor:
    """The cross-entropy weight of each class (num_classes + 1): 1 for the classes,
    `no_object_weight` for the last, "no object"."""
    weight = torch.ones(num_classes + 1)
    weight[num_classes] = no_object_weight
    return weight


class MaskClassificationLoss(nn.Module):
    """Hungarian-matched BCE + dice mask loss and weighted cross-entropy class loss, applied to
    every supervised depth of the model output (each depth matched on its own)."""

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        video_matching: str = "first_frame",
    ):
        super().__init__()
        if video_matching not in VIDEO_MATCHING:
            raise ValueError(
                f"video_matching must be one of {VIDEO_MATCHING}, got {video_matching!r}"
            )
        self.video_matching = video_matching
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.register_buffer("empty_weight", class_weights(num_classes, no_object_weight))

    def forward(
        self, predictions: list[dict], targets: list[dict], num_masks: float | None = None
    ) -> dict[str, Tensor]:
        """Unweighted `loss_{mask,dice,class}_{depth}` terms and their weighted total `loss`.

        The mask terms are sums over matched masks divided by `num_masks`, by default the
        number of target masks (`count_masks`, at least 1). The trainer passes the mean over
        all micro-batches and processes of its step, so that a step does not depend on how its
        batch is split. Clips (VidEoMT) are matched per clip, then scored frame by frame."""
        self._check_inputs(predictions, targets)
        video = predictions[0]["mask_logits"].dim() == 5
        if video:
            targets = [present_tracks(target) for target in targets]
        if num_masks is None:
            num_masks = max(float(sum(count_masks(t) for t in targets)), 1.0)
        losses = {}
        total = 0.0
        for depth, prediction in enumerate(predictions):
            mask_logits = prediction["mask_logits"].float()
            class_logits = prediction["class_logits"].float()
            frame_targets = targets
            if video:
                indices = self.matcher.match_clips(
                    mask_logits, class_logits, targets, self.video_matching
                )
                mask_logits, class_logits, frame_targets, indices = frames_as_images(
                    mask_logits, class_logits, targets, indices
                )
            else:
                indices = self.matcher(mask_logits, class_logits, targets)
            loss_mask, loss_dice = self.mask_losses(mask_logits, frame_targets, indices, num_masks)
            loss_class = self.class_loss(class_logits, frame_targets, indices)
            losses[f"loss_mask_{depth}"] = loss_mask
            losses[f"loss_dice_{depth}"] = loss_dice
            losses[f"loss_class_{depth}"] = loss_class
            total = total + (
                self.mask_weight * loss_mask
                + self.dice_weight * loss_dice
                + self.class_weight * loss_class
            )
        losses["loss"] = total
        return losses

    def mask_losses(
        self,
        mask_logits: Tensor,
        targets: list[dict],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched pairs, each summed over masks / num_masks."""
        device = mask_logits.device
        # One advanced index over the batch: its backward scatters into a single gradient buffer.
        image_idx = torch.cat(
            [torch.full_like(query_idx, image) for image, (query_idx, _) in enumerate(indices)]
        )
        query_idx = torch.cat([query_idx for query_idx, _ in indices])
        matched_logits = mask_logits[image_idx.to(device), query_idx.to(device)]
        if matched_logits.shape[0] == 0:
            # Zero, but still tied to the logits so that backward reaches every parameter.
            zero = mask_logits.sum() * 0.0
            return zero, zero

        with torch.no_grad():
            points = sample_uncertain_points(
                matched_logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            # Targets are sampled per image: images may differ in size.
            points_per_image = points.split([len(query_idx) for query_idx, _ in indices])
            point_targets = torch.cat(
                [
                    point_sample(target["masks"][target_idx.to(device)].float(), image_points)
                    for target, (_, target_idx), image_points in zip(
                        targets, indices, points_per_image
                    )
                ]
            )
        point_logits = point_sample(matched_logits, points)

        loss_mask = F.binary_cross_entropy_with_logits(
            point_logits, point_targets, reduction="none"
        ).mean(1)
        probs = point_logits.sigmoid()
        loss_dice = 1.0 - (2.0 * (probs * point_targets).sum(1) + 1.0) / (
            probs.sum(1) + point_targets.sum(1) + 1.0
        )
        return loss_mask.sum() / num_masks, loss_dice.sum() / num_masks

    def class_loss(
        self, class_logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """Cross-entropy over all queries; unmatched queries are supervised as no-object."""
        device = class_logits.device
        target_classes = torch.full(
            class_logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )
        for image, (target, (query_idx, target_idx)) in enumerate(zip(targets, indices)):
            target_classes[image, query_idx.to(device)] = target["labels"][target_idx.to(device)]
        return F.cross_entropy(class_logits.transpose(1, 2), target_classes, self.empty_weight)

    def _check_inputs(self, predictions: list[dict], targets: list[dict]) -> None:
        if len(predictions) == 0:
            raise ValueError("predictions: expected a non-empty list of per-depth outputs")
        video = predictions[0]["mask_logits"].dim() == 5
        for depth, prediction in enumerate(predictions):
            mask_shape = tuple(prediction["mask_logits"].shape)
            class_shape = tuple(prediction["class_logits"].shape)
            lead = 3 if video else 2  # (B, T, K) or (B, K)
            if (
                len(mask_shape) != lead + 2
                or len(class_shape) != lead + 1
                or mask_shape[:lead] != class_shape[:lead]
            ):
                expected = "(B, K, h, w) and (B, K, C+1)"
                if video:
                    expected = "(B, T, K, h, w) and (B, T, K, C+1)"
                raise ValueError(
                    f"predictions[{depth}]: mask_logits {mask_shape} and class_logits "
                    f"{class_shape} must be {expected}"
                )
            if class_shape[-1] != self.num_classes + 1:
                raise ValueError(
                    f"predictions[{depth}]['class_logits']: last dim {class_shape[-1]}, expected "
                    f"num_classes + 1 = {self.num_classes + 1}"
                )
            if mask_shape[0] != len(targets):
                raise ValueError(
                    f"predictions[{depth}]: batch size {mask_shape[0]} but {len(targets)} targets"
                )
        frames = predictions[0]["mask_logits"].shape[1] if video else None
        check_targets(targets, self.num_classes, frames)


def check_targets(targets: list[dict], num_classes: int, frames: int | None = None) -> None:
    """Each target's masks (N, H, W), or for clips of `frames` frames (N, frames, H, W), and
    labels (N,) in [0, num_classes), or a ValueError naming the target."""
    for image, target in enumerate(targets):
        masks, labels = target["masks"], target["labels"]
        dims = 3 if frames is None else 4
        if (
            masks.dim() != dims
            or labels.dim() != 1
            or masks.shape[0] != labels.shape[0]
            or (frames is not None and masks.shape[1] != frames)
        ):
            shape = "(N, H, W)" if frames is None else f"(N, T={frames}, H, W)"
            raise ValueError(
                f"targets[{image}]: masks {tuple(masks.shape)} and labels "
                f"{tuple(labels.shape)} must be {shape} and (N,)"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{image}]['labels']: values must lie in [0, {num_classes}), "
                f"got min {int(labels.min())} max {int(labels.max())}"
            )


def frames_as_images(
    mask_logits: Tensor, class_logits: Tensor, targets: list[dict], indices: list
) -> tuple[Tensor, Tensor, list[dict], list]:
    """Clips as B x T images for the per-image losses: logits (B*T, K, ...), one target per
    frame (the tracks' masks in it, all their labels) and each clip's match in each frame."""
    frames = mask_logits.shape[1]
    frame_targets = [
        {"masks": target["masks"][:, frame], "labels": target["labels"]}
        for target in targets
        for frame in range(frames)
    ]
    frame_indices = [match for match in indices for _ in range(frames)]
    return mask_logits.flatten(0, 1), class_logits.flatten(0, 1), frame_targets, frame_indices
