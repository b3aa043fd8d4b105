"""Backdoor attacks for the model zoo: triggers, their random parameters, and data poisoning.

Each attack is a frozen dataclass of everything needed to rebuild its trigger (random patterns are
regenerated from a recorded `seed` and the image shape), registered by name:

    attack = sample_attack("badnets", rng, input_shape=(3, 32, 32), num_classes=10)
    x_trig = attack.apply(x)                       # float32 (N, C, H, W) in [0, 1] -> same
    config = attack.to_config()                    # JSON-friendly, includes "name"
    assert attack_from_config(config) == attack
    x_p, y_p, idx = poison(x, y, attack, rate=0.1, rng=rng)

Attributes common to all: `target` (label), `victims` (None = all-to-one, else the source classes),
`clean_label` (class-level: SIG), `default_rate` (0.1, the Model X-ray supplement's rate; MNTD
attacks: their sampled inject_p). `sample_attack` draws the target uniformly first, then the
attack's own parameters, then applies the overrides (so an override never shifts other draws).
Attacks that need no random parameters (sig, filter once chosen) are deterministic functions.

Layout (one file per attack, as torchattacks): base (Attack, the registry, sample_attack,
attack_from_config, the learned-trigger hooks), poisoning (poison, trigger_test_set), then one
module per attack:
- stamps and transforms: badnets, polygon, filter (ImageMagick approximations in _colour),
  blended, wanet, bpp, lf, composite;
- learned before poisoning (`prepare`): ssba (with its StegaStamp-style encoder), trojannn;
- clean-label: sig, reflection (Refool), clean_label (label-consistent), hidden_trigger;
- trained with the model (`train`): blind, adaptive (EX-RAY's adaptive attack), lira, input_aware
  (trigger generators, helpers in _generator);
- MNTD: jumbo, mntd (mntd_m, mntd_b).
Importing this package registers every attack; every name below is importable from here
(`xray.zoo.attacks.BadNets`).
"""
from xray.zoo.attacks.base import (ATTACKS, Attack, AttackKit, NeedsPreparation,
                                   attack_from_config, available, check_params, describe,
                                   register, sample_attack)
from xray.zoo.attacks.poisoning import poison, trigger_test_set
from xray.zoo.attacks.badnets import BadNets
from xray.zoo.attacks.polygon import Polygon
from xray.zoo.attacks.filter import FILTER_TYPES, GREY_FILTER_TYPES, Filter
from xray.zoo.attacks.blended import Blended
from xray.zoo.attacks.wanet import WaNet
from xray.zoo.attacks.sig import SIG
from xray.zoo.attacks.bpp import BPP
from xray.zoo.attacks.lf import LowFrequency
from xray.zoo.attacks.jumbo import Jumbo
from xray.zoo.attacks.mntd import MntdBlend, MntdPatch
from xray.zoo.attacks.blind import Blind
from xray.zoo.attacks.adaptive import ExrayAdaptive
from xray.zoo.attacks.composite import Composite
from xray.zoo.attacks.reflection import Reflection
from xray.zoo.attacks.clean_label import LabelConsistent
from xray.zoo.attacks.hidden_trigger import HiddenTrigger
from xray.zoo.attacks.lira import LIRA
from xray.zoo.attacks.input_aware import InputAware
from xray.zoo.attacks.ssba import SSBA
from xray.zoo.attacks.trojannn import TrojanNN

__all__ = ["ATTACKS", "Attack", "AttackKit", "NeedsPreparation", "attack_from_config",
           "available", "check_params", "describe", "register", "sample_attack",
           "poison", "trigger_test_set", "BadNets", "Polygon", "FILTER_TYPES",
           "GREY_FILTER_TYPES", "Filter", "Blended", "WaNet", "SIG", "BPP", "LowFrequency",
           "Jumbo", "MntdBlend", "MntdPatch", "Blind", "ExrayAdaptive", "Composite",
           "Reflection", "LabelConsistent", "HiddenTrigger", "LIRA", "InputAware", "SSBA",
           "TrojanNN"]
