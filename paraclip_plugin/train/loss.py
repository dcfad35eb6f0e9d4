"""The ParaCLIP loss: a weighted sum of symmetric InfoNCE terms between pairs of fields.

Each term is open_clip's ``ClipLoss`` (its feature gathering honours ``--local-loss`` and
``--gather-with-grad``) applied to two of the four fields with the model's learned logit scale.
The paper's loss is L(image, para2) + L(caption, para1) + L(para1, para2); other rows of its
Table 2 ablation are other ``terms``.
"""
import torch.nn as nn
from open_clip.loss import ClipLoss

# field name -> key of that field's features in the model output (see model.ParaphraseForward)
FEATURE_KEYS = {
    "image": "image_features",
    "caption": "text_features",
    "para1": "para1_features",
    "para2": "para2_features",
}
DEFAULT_TERMS = "image:para2,caption:para1,para1:para2"


def parse_terms(spec):
    """``"image:para2,caption:para1"`` -> ``[("image", "para2"), ("caption", "para1")]``."""
    terms = []
    for item in spec.split(","):
        pair = tuple(field.strip() for field in item.split(":"))
        if len(pair) != 2:
            raise ValueError(f"term '{item}' is not of the form FIELD:FIELD")
        unknown = [field for field in pair if field not in FEATURE_KEYS]
        if unknown:
            raise ValueError(f"unknown field '{unknown[0]}' in term '{item}'; fields are {', '.join(FEATURE_KEYS)}")
        if pair[0] == pair[1]:
            raise ValueError(f"term '{item}' pairs a field with itself")
        terms.append(pair)
    if len(set(terms)) != len(terms):
        raise ValueError(f"'{spec}' repeats a term")
    return terms


def parse_weights(spec, num_terms):
    if spec is None:
        return [1.0] * num_terms
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != num_terms:
        raise ValueError(f"{len(weights)} weights given for {num_terms} terms")
    return weights


class ParaCLIPLoss(nn.Module):

    def __init__(self, terms, weights=None, **clip_loss_kwargs):
        super().__init__()
        self.terms = list(terms)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.terms)
        assert len(self.weights) == len(self.terms)
        self.clip_loss = ClipLoss(**clip_loss_kwargs)

    def forward(self, image_features, text_features, para1_features, para2_features, logit_scale,
                logit_bias=None, output_dict=False):
        features = dict(image=image_features, caption=text_features, para1=para1_features, para2=para2_features)
        losses = {
            f"{a}_{b}_loss": weight * self.clip_loss(features[a], features[b], logit_scale, logit_bias)
            for (a, b), weight in zip(self.terms, self.weights)
        }
        return losses if output_dict else sum(losses.values())
