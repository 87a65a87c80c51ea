"""The settings of one training run, in one place: the resume fingerprint, the run folder's name, the
train_config.json fields and the adapter file's metadata are all read off `TrainSettings`.

Fields marked `trained` change what is trained: they make the resume fingerprint (a checkpoint written under
other values is refused). The rest say how and where the run happens. A trained field added after the release
(method, train_method) names its `legacy` value: a state.pt written before it existed lacks the key and is read
as holding that value (UnGuide's), so old runs still resume.
"""
from dataclasses import dataclass, field, fields

import torch


_NO_LEGACY = object()


def trained(legacy=_NO_LEGACY, **kw):
    """A field of the resume fingerprint; `legacy`: its value for checkpoints written before the field existed."""
    meta = {"resume": True} if legacy is _NO_LEGACY else {"resume": True, "legacy": legacy}
    return field(metadata=meta, **kw)


def num(v: float) -> str:
    """8.0 -> '8', 0.5 -> '0.5' (the release's spelling in folder names)."""
    return str(int(v)) if float(v).is_integer() else str(v)


@dataclass
class TrainSettings:
    # ---- what is trained (the resume fingerprint; these names are the keys of state.pt's "args") ----------
    lora_rank: int | None = trained()          # None for full-rank methods (esd)
    lora_alpha: float | None = trained()
    targets: list[str] = trained()             # the adapted layers (module paths), once the model is known
    lr: float = trained()
    target_prompt: str = trained()
    reference_prompt: str = trained()
    ddim_steps: int = trained()
    schedule: str = trained()                  # "standard" or "release"
    image_size: int = trained()
    start_guidance: float = trained()
    negative_guidance: float = trained()
    ddim_eta: float = trained()
    base_sha256: str | None = trained()        # the base checkpoint's file hash, once it is read
    seed: int = trained()
    preserve: list[str] | None = trained()     # None when there are no preservation prompts
    preserve_weight: float | None = trained()  # None when there are no preservation prompts
    method: str = trained(default="unguide", legacy="unguide")         # a key of ldm.erasure.methods.METHODS
    train_method: str | None = trained(default=None, legacy=None)      # ESD's parameter set (esd only)
    sepce: dict | None = trained(default=None, legacy=None)            # SepCE's options (sepce only)
    adversarial: dict | None = trained(default=None, legacy=None)      # the adversarial term's (AdversarySettings)
    erase_also: list[str] | None = trained(default=None, legacy=None)  # other wordings erased too (--erase_synonyms)
    # ---- how and where ---------------------------------------------------------------------------------------
    iterations: int = 200
    config: str = ""
    ckpt: str = ""
    prompts_json: str = ""
    class_name: str = ""
    output_dir: str = "output"
    target_modules: list[str] = field(default_factory=list)  # as given on the command line
    target_preset: list[str] = field(default_factory=list)   # what selected the layers (nsfw.json forces "nsfw")
    precision: str = "fp32"                    # the UNet's autocast dtype
    device: str = "cpu"                        # the resolved device
    save_every: int = 50
    save_losses: bool = False
    resume: bool = False
    arguments: dict = field(default_factory=dict)  # the command line's arguments, for the record

    def fingerprint(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("resume")}

    @classmethod
    def legacy_values(cls) -> dict:
        """{field: value} for fingerprint keys that checkpoints written before the field existed lack."""
        return {f.name: f.metadata["legacy"] for f in fields(cls) if "legacy" in f.metadata}

    def run_name(self) -> str:
        """The release's folder name, e.g. class_name_cat_lora_rank_1_lora_alpha_8_iterations_200_lr_3e-05_...;
        other methods put theirs first: method_esd_class_name_cat_train_method_xattn_iterations_1000_..."""
        if self.method != "unguide":
            parts = {"method": self.method, "class_name": self.class_name, "train_method": self.train_method,
                     "iterations": self.iterations, "lr": self.lr, "start_guidance": num(self.start_guidance),
                     "negative_guidance": num(self.negative_guidance), "ddim_steps": self.ddim_steps}
            if self.sepce:  # SepCE: its own options instead of the guidance scales it does not use
                parts = {k: v for k, v in parts.items() if not k.endswith("guidance")}
                parts.update(reg_beta=self.sepce["reg_beta"], threshold=self.sepce["threshold"],
                             preserve=len(self.preserve or []))
            parts.update(self._training_options())
            return "_".join(f"{k}_{v}" for k, v in parts.items() if v is not None)
        parts = {"class_name": self.class_name, "lora_rank": self.lora_rank, "lora_alpha": num(self.lora_alpha),
                 "iterations": self.iterations, "lr": self.lr, "start_guidance": self.start_guidance,
                 "negative_guidance": self.negative_guidance, "ddim_steps": self.ddim_steps}
        if self.preserve:  # ours, not the release's: its own folder
            parts.update(preserve=len(self.preserve), preserve_weight=num(self.preserve_weight))
        parts.update(self._training_options())
        return "_".join(f"{k}_{v}" for k, v in parts.items())

    def _training_options(self) -> dict:
        """The folder-name parts of our training options that any ESD-objective method can take."""
        parts = {}
        if self.adversarial:
            parts["adversarial"] = f"{self.adversarial['tokens']}x{self.adversarial['every']}"
        if self.erase_also:
            parts["synonyms"] = len(self.erase_also)
        return parts

    def config_record(self) -> dict:
        """train_config.json before training: the release's keys first, then ours (the loop fills in the
        losses, status and timing)."""
        alpha = self.lora_alpha
        alpha = int(alpha) if alpha is not None and float(alpha).is_integer() else alpha
        ours = {} if self.method == "unguide" else {"method": self.method, "train_method": self.train_method}
        if self.adversarial:
            ours["adversarial"] = self.adversarial
        if self.erase_also:
            ours["erase_also"] = list(self.erase_also)
        return {
            "config": self.config, "ckpt": self.ckpt, "lora_rank": self.lora_rank, "lora_alpha": alpha,
            "target_modules": self.target_modules, "iterations": self.iterations, "lr": self.lr,
            "image_size": self.image_size, "ddim_steps": self.ddim_steps, "ddim_eta": self.ddim_eta,
            "start_guidance": self.start_guidance, "negative_guidance": self.negative_guidance,
            "target_prompt": self.target_prompt, "reference_prompt": self.reference_prompt,
            "preserve": list(self.preserve or []), "preserve_weight": self.preserve_weight,
            "prompts_json": self.prompts_json, "class_name": self.class_name, "final_loss": None,
            "average_loss": None, "arguments": self.arguments, "seed": self.seed, "schedule": self.schedule,
            "precision": self.precision, "target_preset": self.target_preset, "target_layers": self.targets,
            "base_sha256": self.base_sha256, "device": self.device, "torch_version": torch.__version__,
            "status": "running", "iterations_done": 0, **ours,
        }

    def adapter_metadata(self) -> dict[str, str]:
        """What the adapter file records of the run (besides its status, which the loop adds)."""
        return {"class_name": self.class_name, "target_prompt": self.target_prompt, "config": self.config,
                "reference_prompt": self.reference_prompt, "lr": repr(float(self.lr)), "seed": str(self.seed),
                "schedule": self.schedule, "ddim_steps": str(self.ddim_steps),
                **({} if self.method == "unguide" else {"method": self.method, "train_method": self.train_method,
                                                        "start_guidance": repr(float(self.start_guidance)),
                                                        "negative_guidance": repr(float(self.negative_guidance))})}
