"""The cell classes, in one place. Class id 0 is background everywhere (maps, logits, COCO)."""

CLASS_NAMES = ("RBC", "WBC", "Platelets")
CLASS_IDS = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
NUM_CLASSES = len(CLASS_NAMES) + 1  # with background: the NC branch's channels
