"""The tiny synthetic pipeline run that the flow, browsing and report tests share (one per test session)."""

TINY = [
    "prepare_data.synthetic.num_images=40", "prepare_data.synthetic.min_size=64", "prepare_data.synthetic.max_size=80",
    "train_cam.crop=64", "train_cam.resize_long=[48,80]", "train_cam.batch_size=4", "train_cam.max_steps=3",
    "train_cam.trainable_from=3", "train_cam.num_workers=0", "train_cam.val_max_images=4", "train_cam.log_every=1",
    "make_pseudo_labels.method=irn", "make_ir_labels.workers=1", "train_irn.max_steps=3", "train_irn.batch_size=4",
    "train_irn.num_workers=0", "train_irn.checkpoint_every=2", "make_pseudo_labels.exp_times=3",
    "make_pseudo_labels.workers=1",
    "train_seg.max_steps=3", "train_seg.batch_size=4", "train_seg.crop=64", "train_seg.num_workers=0",
    "train_seg.val_size=80", "eval_seg.test_size=80", "eval_seg.num_workers=0", "eval_seg.crf_workers=1",
    "eval_seg.overlays=2",
]

