"""Models: image classifiers (surrogates and victims, :mod:`protect.models.classifiers`) ,
CLIP encoders (:mod:`protect.models.clip`) and self-supervised encoders (:mod:`protect.models.ssl`). Methods and the attack suite build every network
here; nothing in this package knows about noise methods or jobs."""

from protect.models.classifiers import CLASSIFIERS, Normalize, build_classifier

__all__ = ["CLASSIFIERS", "Normalize", "build_classifier"]
