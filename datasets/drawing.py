"""Detections drawn on an image (matplotlib): the figures of `python -m analysis show` and the
pictures of `python -m experiments predict` draw their boxes with `draw_detections`."""
from matplotlib import colormaps, patches


def class_colour(label):
    """The colour of a contiguous class label (tab10, repeating)."""
    return colormaps["tab10"](int(label) % 10)


def draw_detections(ax, boxes, scores, labels, names, fontsize=6, linewidth=1.5):
    """Each detection on `ax` as a rectangle (gid "detection") in its class colour with "<class
    name> <score>" above its top-left corner. boxes: (n, 4) xyxy in the pixels of the image drawn on
    `ax`; scores (n,), labels (n,) contiguous; names: the class names by label."""
    boxes, scores, labels = (list(v.tolist() if hasattr(v, "tolist") else v) for v in (boxes, scores, labels))
    for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
        colour = class_colour(label)
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                       linewidth=linewidth, gid="detection"))
        ax.text(x0, y0, f"{names[label]} {score:.2f}", fontsize=fontsize, color="white", va="bottom",
                bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.8))
