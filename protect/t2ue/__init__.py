"""T2UE: unlearnable noise from a text description alone.

Ma, Huang, Song, Sun, Gao, Jiang, "T2UE: Generating Unlearnable Examples from Text
Descriptions" (arXiv:2508.03091). A generator G maps a CLIP text embedding e = f_T(t) and a
random code z ~ N(0, I) to an L-inf perturbation of at most eps (8/255):

    G(e, z) = eps * tanh(conv(blocks(reshape(FC(z)))))   float32 (N, 3, R, R)

FC(z) is reshaped to a 4x4 feature map (512 channels in the paper) and grown by
semantic-spatial aware blocks (SSACN, from SSA-GAN: Liao et al., CVPR 2022), each doubling the
size and normalising its features with SSCBN, a batch norm whose scale and shift are predicted
from the text embedding and applied where a predicted spatial mask is high.

G is trained once, on image-text pairs, against a frozen CLIP surrogate: it minimises the
InfoNCE (CLIP) loss between f_I(x + G(f_T(t), z)) and f_T(t) (error-minimising noise for
contrastive learning), with Adam (decoupled weight decay), lr 1e-4 and a cosine schedule. After
that anyone produces protective noise from a caption alone (:func:`noise_from_text`): the image
never meets the generator.

Layout: :mod:`~protect.t2ue.network` (the generator, its files, noise from text),
:mod:`~protect.t2ue.data` (image-text pairs), :mod:`~protect.t2ue.training` (training against
a frozen CLIP), :mod:`~protect.t2ue.cli` (``protect t2ue train|noise|apply``); the noise method
that uses a trained generator is :mod:`protect.methods.t2ue`.

A trained generator is stored as ``NAME.safetensors`` (weights plus a fingerprint of the text
encoder) and ``NAME.yaml`` (architecture, eps, which CLIP it belongs to, how it was trained).
Training checkpoints (``checkpoint.safetensors`` + ``checkpoint.json``) are written atomically
after every epoch, so an interrupted training resumes where it stopped.
"""

from protect.t2ue.data import (
    CLIP_TEMPLATES,
    TextImagePairs,
    class_captions,
    pairs_from_file,
    pairs_from_folder,
    read_caption_records,
)
from protect.t2ue.network import (
    BACKBONES,
    GeneratorSpec,
    LoadedGenerator,
    NoiseGenerator,
    T2UEError,
    TextCondition,
    TextToNoiseGenerator,
    UNetTextToNoiseGenerator,
    build_generator,
    code_for,
    embed_texts,
    encode_captions,
    generator_paths,
    load_generator,
    noise_from_text,
    read_generator_description,
    save_generator,
    template_for,
    text_fingerprint,
)
from protect.t2ue.training import T2UETrainConfig, TrainSummary, infonce_of, train_generator

__all__ = [
    "BACKBONES",
    "CLIP_TEMPLATES",
    "GeneratorSpec",
    "LoadedGenerator",
    "NoiseGenerator",
    "T2UEError",
    "T2UETrainConfig",
    "TextCondition",
    "TextImagePairs",
    "TextToNoiseGenerator",
    "TrainSummary",
    "UNetTextToNoiseGenerator",
    "build_generator",
    "class_captions",
    "code_for",
    "embed_texts",
    "encode_captions",
    "generator_paths",
    "infonce_of",
    "load_generator",
    "noise_from_text",
    "pairs_from_file",
    "pairs_from_folder",
    "read_caption_records",
    "read_generator_description",
    "save_generator",
    "template_for",
    "text_fingerprint",
    "train_generator",
]
