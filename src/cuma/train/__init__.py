"""Training recipes on TRL: conditional SFT (and, later, DPO/GRPO), with profile_embeds carried by the collators."""
