"""Which files radscan uses and the limits on reading them, in one place, shared by all commands."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from radscan.errors import ModelError
from radscan.preprocess import FollowReference, is_box

__all__ = ["Policy", "FRAME_POLICIES", "DEFAULT_MODALITIES", "DEFAULT_BODY_PARTS", "STUDY_KEYS", "FOLDER_STUDY_LIMIT",
           "names_the_chest",
           "parse_list", "for_model"]

FRAME_POLICIES = ("skip", "first", "middle")
DEFAULT_MODALITIES = ("CR", "DX")
# Values seen in the wild for a chest film; an empty BodyPartExamined is accepted (often unset).
DEFAULT_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS")
# With a list that holds one of DEFAULT_BODY_PARTS, a BodyPartExamined one of whose words begins so names
# the chest too: sites write the chest in their own words and languages (CHEST PA, PORT CHEST, TORAX,
# POUMON, PULMAO, BRUSTKORB, TORACE, PECHO, CXR), and a chest film skipped by its name is a film lost (a
# trial: five of six chest films skipped, exit 0, no word). Quality control still judges each film.
CHEST_WORDS = ("CHEST", "THORA", "TORA", "LUNG", "POUMON", "PULM", "BRUST", "PETTO", "PECHO", "CXR")
# ...unless the value names a part of the chest's skeleton instead, in any of those languages: the
# thoracic spine (THORACIC SPINE, THORACOLUMBAR, BRUSTWIRBELSAEULE, COLUNA TORACICA) or the sternum
# (BRUSTBEIN); a review found them read as chests
NOT_THE_CHEST = ("SPIN", "WIRBEL", "COLUN", "VERTEB", "LUMB", "BEIN", "STERN", "RACHI", "DORS", "SACR", "CERVI")


def names_the_chest(body_part: str) -> bool:
    """Whether a BodyPartExamined value (any case; words split at spaces, _, -, /, commas, dots or a
    multi-value backslash) names the chest: one of DEFAULT_BODY_PARTS, or a word that begins with one
    of CHEST_WORDS and none of its text NOT_THE_CHEST."""
    text = body_part.strip().upper()
    if text in DEFAULT_BODY_PARTS:
        return True
    words = [word for word in re.split(r"[\s_\-/\\,.]+", text) if word]
    return any(word.startswith(CHEST_WORDS) for word in words) and not any(part in text for part in NOT_THE_CHEST)


# What a study is for a file whose content names none (JPEG, PNG, a DICOM without StudyInstanceUID):
# "folder" its folder, "file" the file alone, "auto" the folder unless the folder holds more files
# than one examination has (FOLDER_STUDY_LIMIT), when each file is its own study. A chest study is one
# to a few views (PA, lateral, a repeat); a folder of dozens of films is an export or an archive, and
# as one study its films would be one row, only the top one linked from the page (issue 21;
# radscan.ingest.assign_study_keys).
STUDY_KEYS = ("auto", "folder", "file")
FOLDER_STUDY_LIMIT = 8


@dataclass(frozen=True)
class Policy:
    """Selection rules for DICOM images (JPEG/PNG files carry no header and are always used), the
    limits on reading any file, and the part of the film the model is given.

    Attributes
    ----------
    modalities : allowed Modality values; ``None`` allows any (``--modalities all``)
    body_parts : allowed BodyPartExamined values when the tag is set; ``None`` allows any; a list
        that holds one of DEFAULT_BODY_PARTS allows any value that `names_the_chest` as well
    frames : multi-frame objects: ``skip`` them, or use the ``first`` or ``middle`` frame
    for_processing : also use images whose PresentationIntentType is FOR PROCESSING (raw detector
        data that is not meant for display; off by default)
    max_pixels : refuse images larger than this per frame (decompression bombs, corrupt headers)
    read_timeout : give up a file whose decoding takes longer than this many seconds
    crop : the model's box (fractions of the film: left, top, right, bottom) cut from every film
        before resizing (radscan.preprocess.to_model_input); None for the whole film. Set from the
        model (`for_model`), never by the user.
    follow : for a model whose box follows the chest, the reference film each film's box is moved
        against (radscan.preprocess.chest_offset); None for a box fixed in the film. From the model.
    trim_padding : with `follow`, read each film less its padding where its chest matches the reference
        better so (radscan.preprocess.film_bounds), for a model made so (setting ``trim_padding``).
    """

    modalities: tuple[str, ...] | None = DEFAULT_MODALITIES
    body_parts: tuple[str, ...] | None = DEFAULT_BODY_PARTS
    frames: str = "skip"
    for_processing: bool = False
    max_pixels: int = 100_000_000
    read_timeout: float = 300.0
    crop: tuple[float, float, float, float] | None = None
    follow: FollowReference | None = None
    # not in repr: it follows from the model, whose sha256 the store's keys hold, and a field added to the
    # repr would make every site read every film again and start a new drift history (a review)
    trim_padding: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.frames not in FRAME_POLICIES:
            raise ValueError(f"frames must be one of {FRAME_POLICIES}, not {self.frames!r}")
        if self.crop is not None and not is_box(self.crop):
            raise ValueError(f"crop must be (left, top, right, bottom) fractions with left < right and "
                             f"top < bottom, not {self.crop!r}")


def for_model(policy: Policy, metadata: dict[str, Any], model_dir: Path) -> Policy:
    """`policy` reading films as the model in `metadata` (its model.json) was trained on them: cut to
    its box when it has one (model setting ``crop``; field "thorax-box"), the box moved with the chest
    when it follows it (setting ``follow``: its reference film is read, verified, from `model_dir`),
    each film less its padding when the model was made so (setting ``trim_padding``).
    model.json is read before the weights are verified; load_model refuses a run whose model.json
    differs from the settings sealed in the weights, before any score is kept. Raises ModelError
    (exit 65) for a crop that is not a box (model.json edited), or a missing or altered reference film."""
    config = metadata.get("config") or {}
    policy = replace(policy, trim_padding=config.get("trim_padding") is True)
    crop = config.get("crop") or None
    if crop is None:
        return replace(policy, crop=None, follow=None)
    try:
        if not isinstance(crop, list) or len(crop) != 4 or not all(isinstance(f, (int, float)) for f in crop):
            raise ValueError("not four numbers")
        box = tuple(float(f) for f in crop)
        if not is_box(box):
            raise ValueError("not a box")
    except ValueError:
        raise ModelError(f"the model's crop in model.json ({str(crop)[:80]}) is not a box of four fractions, left < "
                         "right and top < bottom: the file was edited; restore it") from None
    from radscan.model.field import load_follow

    return replace(policy, crop=box, follow=load_follow(Path(model_dir), metadata))


def parse_list(text: str) -> tuple[str, ...] | None:
    """'CR,DX' -> ('CR', 'DX'); 'all' or '*' -> None (no restriction)."""
    items = tuple(item.strip().upper() for item in text.split(",") if item.strip())
    return None if not items or items in (("ALL",), ("*",)) else items
