"""The book's figures: structure (axes, lines, labels, colours), not pixels."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib as mpl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from skymask_lite import plots  # noqa: E402


def _renders(fig: Figure) -> bool:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getbuffer().nbytes > 0


def _shares(n=20, num_labels=10, seed=0):
    counts = torch.rand(n, num_labels, generator=torch.Generator().manual_seed(seed))
    return counts / counts.sum(dim=1, keepdim=True)


def test_set_style_fixes_size_dpi_and_palette():
    with mpl.rc_context():
        plots.set_style()
        assert tuple(mpl.rcParams["figure.figsize"]) == plots.FIGSIZE
        assert mpl.rcParams["figure.dpi"] == plots.DPI
        cycle = [mpl.colors.to_hex(c) for c in mpl.rcParams["axes.prop_cycle"].by_key()["color"]]
        assert cycle[: len(plots.PALETTE)] == list(plots.PALETTE)


def test_role_colours_are_fixed_distinct_and_not_in_the_palette():
    roles = [plots.ROLE_COLORS[k] for k in ("benign", "malicious", "root")]
    assert roles == [plots.BENIGN, plots.MALICIOUS, plots.ROOT]
    assert len(set(roles)) == 3
    assert not set(roles) & set(plots.PALETTE)


def test_label_heatmap_one_matrix():
    shares = _shares()
    fig = plots.label_heatmap(shares, title="q = 0.5")
    assert isinstance(fig, Figure)
    heat, bar = fig.axes  # the heatmap and its colour bar
    assert heat.get_title() == "q = 0.5"
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("label", "client")
    image = heat.get_images()[0]
    assert torch.allclose(torch.as_tensor(image.get_array()), shares)
    assert image.get_clim() == (0.0, 1.0)
    assert bar.get_ylabel() == "share of the client's examples"
    assert tuple(fig.get_size_inches()) == pytest.approx(plots.FIGSIZE)
    assert _renders(fig)


def test_label_heatmap_panels_share_one_colour_bar():
    panels = {f"q = {q}": _shares(seed=k) for k, q in enumerate((0.1, 0.5, 0.8))}
    fig = plots.label_heatmap(panels, title="bias split")
    assert len(fig.axes) == 4  # three heatmaps and one colour bar
    assert [ax.get_title() for ax in fig.axes[:3]] == list(panels)
    assert [ax.get_ylabel() for ax in fig.axes[:3]] == ["client", "", ""]
    assert fig.get_suptitle() == "bias split"
    assert fig.get_size_inches()[0] == pytest.approx(plots.BOOK_WIDTH)  # the book's column
    assert _renders(fig)


def test_label_heatmap_class_names_become_ticks():
    names = [f"class {c}" for c in range(10)]
    fig = plots.label_heatmap(_shares(), class_names=names)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names


def test_label_heatmap_rejects_a_vector():
    with pytest.raises(ValueError, match="num_clients, num_labels"):
        plots.label_heatmap(torch.ones(10))


def _records(accs, **extra):
    return [{"round": t + 1, "test_acc": a, **extra} for t, a in enumerate(accs)]


def test_accuracy_curves_one_line_per_run():
    runs = {"by hand": _records([0.5, 0.6, 0.7]), "package": {"rounds": _records([0.4, 0.65, 0.72])}}
    fig = plots.accuracy_curves(runs, title="FedAvg", colors={"package": plots.BENIGN})
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    assert list(lines[0].get_xdata()) == [1, 2, 3]
    assert list(lines[1].get_ydata()) == [0.4, 0.65, 0.72]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["by hand", "package"]
    assert lines[0].get_color() == plots.PALETTE[0]
    assert lines[1].get_color() == plots.BENIGN
    assert lines[0].get_linestyle() != lines[1].get_linestyle()  # coinciding curves stay visible
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("round", "test accuracy", "FedAvg")
    assert _renders(fig)
    assert all(float(t).is_integer() for t in ax.get_xticks())  # no round 2.5


def test_accuracy_curves_other_metric_and_missing_values():
    fig = plots.accuracy_curves({"backdoor": _records([0.1, 0.2], asr=0.9)}, metric="asr")
    assert fig.axes[0].get_ylabel() == "attack success rate"
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [0.9, 0.9]
    with pytest.raises(ValueError, match="no 'asr'"):
        plots.accuracy_curves({"clean": _records([0.1, 0.2])}, metric="asr")
    with pytest.raises(ValueError, match="'rounds'"):
        plots.accuracy_curves({"bad": {"final": {}}})


@pytest.mark.parametrize("channels", [1, 3])
def test_example_images_grid_one_column_per_class(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, channels, 8, 8, generator=g)
    y = torch.arange(40) % 4
    names = ["a", "b", "c", "d"]
    fig = plots.example_images(x, y, names, per_class=2)
    assert len(fig.axes) == 2 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["0\na", "1\nb", "2\nc", "3\nd"]  # class index over name
    shown = fig.axes[4].get_images()[0].get_array()  # row 1, class 0: the second image of class 0
    assert shown.shape == ((8, 8) if channels == 1 else (8, 8, 3))
    assert shown.min() == 0.0 and shown.max() == 1.0
    assert _renders(fig)


def test_example_images_needs_enough_examples():
    with pytest.raises(ValueError, match="fewer than per_class=3"):
        plots.example_images(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 0, 1]), ["a", "b"], per_class=3)


# ----------------------------------------------------------------------------- chapter 2: attacks

import numpy as np  # noqa: E402


def _updates(n=12, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_image_rows_one_row_per_label():
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fig = plots.image_rows({"clean": x, "triggered": x + 1}, titles=["a", "b", "c", "d"])
    assert len(fig.axes) == 2 * 4
    assert [ax.get_ylabel() for ax in fig.axes[::4]] == ["clean", "triggered"]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["a", "b", "c", "d"]
    shown = fig.axes[5].get_images()[0].get_array()  # row 1, column 1
    assert shown.shape == (8, 8) and shown.min() == 0.0 and shown.max() == 1.0
    assert _renders(fig)


def test_image_rows_rejects_ragged_rows_and_wrong_titles():
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match="same k"):
        plots.image_rows({"a": x, "b": x[:2]})
    with pytest.raises(ValueError, match="one title per column"):
        plots.image_rows({"a": x}, titles=["only one"])


def test_coordinate_ranges_shows_benign_range_and_crafted_values():
    benign, crafted = _updates(), _updates(3, seed=1) * 5
    fig = plots.coordinate_ranges(benign, crafted, coords=[0, 2, 5], title="Fang Trim")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "5"]
    ranges = [c for c in ax.collections if c.get_label() == "benign range"]
    assert len(ranges) == 1
    (segment,) = ranges[0].get_segments()
    assert segment[:, 1].tolist() == pytest.approx([benign[:, 0].min().item(), benign[:, 0].max().item()])
    crosses = [c for c in ax.collections if c.get_label() == "malicious"][0]
    assert crosses.get_offsets()[:, 1].tolist() == pytest.approx(crafted[:, 0].tolist())
    assert mpl.colors.to_hex(crosses.get_facecolor()[0]) == plots.MALICIOUS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["benign range", "benign", "benign mean", "malicious"]
    assert ax.get_title() == "Fang Trim"
    assert _renders(fig)


def test_coordinate_ranges_accepts_one_row_and_checks_shapes():
    benign = _updates()
    fig = plots.coordinate_ranges(benign, benign.mean(dim=0))
    assert len(fig.axes[0].get_xticklabels()) == benign.shape[1]
    with pytest.raises(ValueError, match="d = 6"):
        plots.coordinate_ranges(benign, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="nb, d"):
        plots.coordinate_ranges(benign[0], benign[0])


def test_gamma_search_one_panel_per_attack():
    gamma = np.linspace(0, 10, 11)
    curves = {
        "Min-Max": {"gamma": gamma, "value": gamma**2, "bound": 30.0, "best": 5.48},
        "Min-Sum": {"gamma": gamma, "value": gamma + 1, "bound": 4.0, "best": 3.0, "ylabel": "sum"},
    }
    fig = plots.gamma_search(curves, title="gamma search")
    left, right = fig.axes
    assert [left.get_title(), right.get_title()] == ["Min-Max", "Min-Sum"]
    assert (left.get_ylabel(), right.get_ylabel()) == ("constraint's left side", "sum")
    curve, bound, best = left.get_lines()
    assert list(curve.get_ydata()) == list(gamma**2)
    assert list(bound.get_ydata()) == [30.0, 30.0]
    assert list(best.get_xdata()) == [5.48, 5.48]
    assert best.get_color() == plots.MALICIOUS
    assert "5.48" in left.get_legend().get_texts()[-1].get_text()
    assert fig.get_suptitle() == "gamma search"
    assert _renders(fig)
    with pytest.raises(ValueError, match="lacks"):
        plots.gamma_search({"bad": {"gamma": gamma, "value": gamma}})


def test_role_strips_split_benign_and_malicious():
    n, malicious = 10, torch.tensor([1, 4])
    norms = {"Min-Max": torch.arange(n, dtype=torch.float), "Fang Trim": torch.ones(n)}
    fig = plots.role_strips({"norm": norms, "cosine": norms}, malicious, title="stats")
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_title() == "norm"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Min-Max", "Fang Trim"]
    dots = ax.collections  # per group: benign dots, malicious dots
    assert len(dots) == 4
    assert sorted(dots[1].get_offsets()[:, 1].tolist()) == [1.0, 4.0]
    assert len(dots[0].get_offsets()) == n - 2
    assert mpl.colors.to_hex(dots[0].get_facecolor()[0]) == plots.BENIGN
    assert mpl.colors.to_hex(dots[1].get_facecolor()[0]) == plots.MALICIOUS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["benign", "malicious"]
    assert fig.get_suptitle() == "stats"
    assert _renders(fig)
    with pytest.raises(ValueError, match="malicious row indices"):
        plots.role_strips({"norm": {"x": torch.ones(3)}}, [5])


def test_update_pca_separates_a_shifted_group():
    updates = _updates(n=20, d=30)
    updates[:4] += 10.0  # the malicious rows sit far away along one direction
    fig = plots.update_pca({"attack": updates, "copy": updates.clone()}, torch.arange(4), title="PCA")
    ax = fig.axes[0]
    benign, bad = ax.collections
    assert len(benign.get_offsets()) == 16 and len(bad.get_offsets()) == 4
    gap = abs(bad.get_offsets()[:, 0].mean() - benign.get_offsets()[:, 0].mean())
    assert gap > 10  # PC 1 is the shift
    assert ax.get_xlabel().startswith("PC 1")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["benign", "malicious"]
    assert fig.get_suptitle() == "PCA"
    assert _renders(fig)
    with pytest.raises(ValueError, match="n >= 3"):
        plots.update_pca(torch.ones(2, 5), [0])


def test_update_pca_wraps_many_panels():
    panels = {f"attack {k}": _updates(n=10, d=5, seed=k) for k in range(4)}
    fig = plots.update_pca(panels, [0, 1])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == list(panels)
    assert tuple(fig.get_size_inches()) == pytest.approx((plots.BOOK_WIDTH, 2 * plots.PANEL_HEIGHT))
    fig = plots.update_pca(dict(list(panels.items())[:3]), [0], ncols=2)
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    assert _renders(fig)


# ----------------------------------------------------------------------------- chapter 3


def test_client_scores_sorted_bars_coloured_by_role_and_dropped_faded():
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    fig = plots.client_scores(scores, malicious=[3], ylabel="Krum score", kept=[0, 1, 2], threshold=3.5,
                              threshold_label="cut", title="Krum")
    (ax,) = fig.axes
    bars = ax.patches
    assert len(bars) == 5
    assert [b.get_height() for b in bars] == [1.0, 2.0, 3.0, 4.0, 5.0]  # sorted by score
    colours = [mpl.colors.to_hex(b.get_facecolor()) for b in bars]
    assert colours == [plots.BENIGN] * 4 + [plots.MALICIOUS]  # client 3 (score 5) is malicious
    assert [b.get_alpha() for b in bars] == [None, None, None, 0.35, 0.35]  # clients 4 and 3 dropped
    assert [b.get_hatch() for b in bars][3:] == ["///", "///"]
    assert ax.get_lines()[0].get_ydata()[0] == 3.5
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["benign", "malicious", "dropped by the rule", "cut"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("rank (clients sorted by score)", "Krum score", "Krum")
    assert _renders(fig)


def test_client_scores_unsorted_everybody_kept_and_bad_input():
    fig = plots.client_scores([0.2, 0.1], malicious=torch.tensor([0]), ylabel="trust score", sort=False)
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == [0.2, 0.1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["benign", "malicious"]
    assert ax.get_xlabel() == "client"
    with pytest.raises(ValueError, match="one score per client"):
        plots.client_scores(torch.ones(2, 2), malicious=[0], ylabel="s")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        plots.client_scores([1.0, 2.0], malicious=[2], ylabel="s")


def test_client_scatter_hollow_markers_for_dropped_clients_and_a_root_star():
    points = torch.arange(12.0).reshape(6, 2)
    fig = plots.client_scatter(points, malicious=[4, 5], kept=[0, 1, 2, 4], root=torch.tensor([0.5, 0.5]),
                               xlabel="a", ylabel="b", title="FLAME")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["benign, kept", "benign, dropped", "malicious, kept", "malicious, dropped", "root"]
    groups = ax.collections
    assert [len(g.get_offsets()) for g in groups] == [3, 1, 1, 1, 1]
    assert groups[1].get_facecolor().size == 0 or groups[1].get_facecolor()[0][3] == 0  # hollow
    assert mpl.colors.to_hex(groups[2].get_facecolor()[0]) == plots.MALICIOUS
    assert list(groups[4].get_offsets()[0]) == [0.5, 0.5]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("a", "b", "FLAME")
    assert _renders(fig)


def test_client_scatter_everybody_kept_and_bad_shape():
    fig = plots.client_scatter(torch.zeros(3, 2), malicious=[2])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["benign", "malicious"]
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        plots.client_scatter(torch.zeros(3, 3), malicious=[])


def test_metric_heatmap_rows_columns_annotations_and_blank_cells():
    table = {"min_max": {"median": 0.61, "flame": 0.7}, "fang_trim": {"median": 0.5, "fltrust": None, "krum": 0.2}}
    fig = plots.metric_heatmap(table, title="final accuracy")
    heat, bar = fig.axes
    assert [t.get_text() for t in heat.get_yticklabels()] == ["min_max", "fang_trim"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["median", "flame", "fltrust", "krum"]
    assert [t.get_text() for t in heat.texts] == ["0.61", "0.70", "0.50", "0.20"]  # NaN cells unannotated
    assert bar.get_ylabel() == "test accuracy"
    assert heat.collections[0].get_clim() == (0.0, 1.0)
    assert heat.get_title() == "final accuracy"
    assert _renders(fig)
    with pytest.raises(ValueError, match="empty"):
        plots.metric_heatmap({})


def test_detection_bars_two_bars_per_rule_with_values():
    rows = [("Multi-Krum", 0.25, 1.0), ("FLAME", 0.3, 0.0), ("FLTrust", 0.0, 0.05)]
    fig = plots.detection_bars(rows, title="Min-Max")
    (ax,) = fig.axes
    assert len(ax.patches) == 6
    assert [b.get_height() for b in ax.patches] == [0.25, 0.3, 0.0, 1.0, 0.0, 0.05]  # FPR bars, then FNR bars
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Multi-Krum", "FLAME", "FLTrust"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FPR", "FNR"]
    assert [t.get_text() for t in ax.texts] == ["0.25", "0.30", "0.00", "1.00", "0.00", "0.05"]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 1
    assert ax.get_title() == "Min-Max"
    assert _renders(fig)


@pytest.mark.parametrize("rows", [[], [("a", 0.1)], [("a", None, 0.2)], [("a", 0.1, 1.5)]])
def test_detection_bars_rejects_bad_rows(rows):
    with pytest.raises(ValueError):
        plots.detection_bars(rows)



# ----------------------------------------------------------------------------- chapter 5: the Gaussian mixture


def _mask_info(n=12, seed=0):
    """A cluster_masks info dict: ``n`` clients and the root (last row), two mixture components."""
    from skymask_lite.skymask import cluster_masks

    g = torch.Generator().manual_seed(seed)
    honest = torch.rand(n - 3 + 1, 200, generator=g) < 0.8          # n-3 honest clients and the root
    crafted = (torch.rand(1, 200, generator=g) < 0.2).expand(3, -1)  # three identical attackers
    masks = torch.cat([honest[:-1], crafted, honest[-1:]])          # [n+1, 200], root last
    return cluster_masks(masks, criterion="always")


def test_mask_pca_draws_clients_root_and_ellipses():
    kept, info = _mask_info()
    malicious = torch.arange(9, 12)
    fig = plots.mask_pca(info, malicious, kept=kept, title="Min-Max")
    ax = fig.axes[0]
    assert ax.get_title() == "Min-Max"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC 1", "PC 2")
    ellipses = ax.get_lines()
    assert len(ellipses) == 2 * 2  # 1- and 2-sigma for each of the two components
    assert [line.get_linestyle() for line in ellipses[:2]] == ["-", "--"]
    # the 1-sigma ellipse is centred on its component's mean and half as wide as the 2-sigma one
    one, two = ellipses[0].get_xydata(), ellipses[1].get_xydata()
    mean = info["means"][0].numpy()
    assert one.mean(axis=0) == pytest.approx(mean, abs=1e-2 * np.ptp(one))
    assert np.ptp(two[:, 0]) == pytest.approx(2 * np.ptp(one[:, 0]))
    benign, bad, root = ax.collections  # kept benign clients, dropped attackers, the root star
    assert len(benign.get_offsets()) == 9 and len(bad.get_offsets()) == 3
    assert root.get_offsets()[0].tolist() == pytest.approx(info["points"][-1].tolist())
    assert mpl.colors.to_hex(benign.get_facecolor()[0]) == plots.BENIGN
    assert len(bad.get_facecolor()) == 0 or bad.get_facecolor()[0][3] == 0  # dropped: hollow
    assert mpl.colors.to_hex(bad.get_edgecolor()[0]) == plots.MALICIOUS
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["1$\\sigma$ ellipse", "2$\\sigma$ ellipse", "benign", "malicious", "root", "dropped (hollow)"]
    assert _renders(fig)


def test_mask_pca_panels_per_panel_malicious_and_mixture_choice():
    kept, info = _mask_info()
    one = {**info, "means": info["means"][:1], "covariances": info["covariances"][:1]}  # a 1-component fit
    fig = plots.mask_pca({"no attack": one, "attack": info}, {"no attack": [], "attack": [9, 10, 11]}, title="round 1")
    assert [ax.get_title() for ax in fig.axes] == ["no attack", "attack"]
    assert len(fig.axes[0].get_lines()) == 2 and len(fig.axes[1].get_lines()) == 4
    assert len(fig.axes[0].collections) == 2  # benign and root: nobody malicious in that panel
    assert fig.get_suptitle() == "round 1"
    assert "dropped (hollow)" not in [t.get_text() for t in fig.legends[0].get_texts()]
    two = plots.mask_pca(one, [], mixture="two")
    assert len(two.axes[0].get_lines()) == 4  # fit2 drawn instead of the chosen single component
    assert _renders(fig)


def test_mask_pca_groups_and_errors():
    _, info = _mask_info()
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 0, 0])
    fig = plots.mask_pca(info, [9, 10, 11], groups=groups, group_name="label")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[2:6] == ["label 0", "label 1", "label 2", "malicious"]
    with pytest.raises(ValueError, match="one integer"):
        plots.mask_pca(info, [], groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lacks"):
        plots.mask_pca({"points": info["points"]}, [])
    with pytest.raises(ValueError, match="mixture"):
        plots.mask_pca(info, [], mixture="three")


def test_detection_rounds_two_panels_and_missing_rates():
    runs = {
        "Min-Max": [{"round": t, "fpr": 0.0, "fnr": 0.1 * t} for t in (1, 2, 3)],
        "no attack": {"rounds": [{"round": t, "fpr": 0.2, "fnr": None} for t in (1, 2, 3)]},
    }
    fig = plots.detection_rounds(runs, title="SkyMask")
    fpr, fnr = fig.axes
    assert (fpr.get_title(), fnr.get_title()) == ("FPR", "FNR")
    assert [len(line.get_xdata()) for line in fpr.get_lines()] == [3, 3]
    assert [len(line.get_xdata()) for line in fnr.get_lines()] == [3, 0]  # no FNR without attackers
    assert list(fnr.get_lines()[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Min-Max", "no attack"]
    assert fig.get_suptitle() == "SkyMask"
    assert _renders(fig)


# ----------------------------------------------------------------------------- chapter 4: learnable masks


def _tiny_cnn():
    from torch import nn

    class Tiny(nn.Module):  # weights [3, 2, 2, 2] and [4, 12], biases [3] and [4]: d = 24 + 3 + 48 + 4
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 2)
            self.fc = nn.Linear(12, 4)

    return Tiny()


def test_mask_heatmaps_one_panel_per_model_and_layer():
    net = _tiny_cnn()
    values = torch.rand(5, 79, generator=torch.Generator().manual_seed(0))
    rows = {"honest": 0, "attacker": 2, "root": 4}
    fig = plots.mask_heatmaps(values, net, rows, malicious=[2, 3], title="masks")
    assert len(fig.axes) == 3 * 2 + 1  # 3 models x 2 weight tensors, one colour bar
    assert [ax.get_title() for ax in fig.axes[:2]] == ["conv.weight\n[3 x 8]", "fc.weight\n[4 x 12]"]
    shown = fig.axes[3].get_images()[0]  # row "attacker", layer fc.weight
    assert torch.allclose(torch.as_tensor(shown.get_array()), values[2, 27:75].reshape(4, 12))
    assert shown.get_clim() == (0.0, 1.0)
    labels = [fig.axes[2 * r].get_ylabel() for r in range(3)]
    assert labels == list(rows)
    colours = [mpl.colors.to_hex(fig.axes[2 * r].yaxis.label.get_color()) for r in range(3)]
    assert colours == [plots.BENIGN, plots.MALICIOUS, plots.ROOT]
    assert fig.get_suptitle() == "masks"
    assert _renders(fig)


def test_mask_heatmaps_chosen_layers_and_errors():
    net = _tiny_cnn()
    values = torch.zeros(3, 79)
    fig = plots.mask_heatmaps(values, net, {"a": 0}, layers=["fc.bias"], root_index=None)
    assert fig.axes[0].get_title() == "fc.bias\n[1 x 4]"
    assert mpl.colors.to_hex(fig.axes[0].yaxis.label.get_color()) == plots.BENIGN
    with pytest.raises(ValueError, match="unknown or no layers"):
        plots.mask_heatmaps(values, net, {"a": 0}, layers=["conv9.weight"])
    with pytest.raises(ValueError, match="79 parameters"):
        plots.mask_heatmaps(torch.zeros(3, 80), net, {"a": 0})
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        plots.mask_heatmaps(values, net, {"a": 3})


def test_client_layer_heatmap_groups_rows_by_role():
    table = torch.arange(12, dtype=torch.float).reshape(6, 2) / 12  # model i has values 2i/12, (2i+1)/12
    fig = plots.client_layer_heatmap(table, ["conv", "fc"], malicious=[1, 3], title="mean masks")
    heat = fig.axes[0]
    shown = torch.as_tensor(heat.get_images()[0].get_array())
    assert torch.allclose(shown, table[[0, 2, 4, 1, 3, 5]])  # benign 0, 2, 4; malicious 1, 3; root 5
    ticks = heat.get_yticklabels()
    assert [t.get_text() for t in ticks] == ["benign (3)", "malicious (2)", "root"]
    assert [mpl.colors.to_hex(t.get_color()) for t in ticks] == [plots.BENIGN, plots.MALICIOUS, plots.ROOT]
    assert list(heat.get_yticks()) == [1.0, 3.5, 5.0]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["conv", "fc"]
    assert heat.get_title() == "mean masks"
    assert _renders(fig)
    with pytest.raises(ValueError, match="one name per column"):
        plots.client_layer_heatmap(table, ["conv"], [1])
    with pytest.raises(ValueError, match=r"\[k, L\]"):
        plots.client_layer_heatmap(torch.ones(6), ["conv"], [1])


def test_loss_curves_start_at_step_zero():
    fig = plots.loss_curves([1.5, 1.0, 0.8], title="mask training")
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [1.5, 1.0, 0.8]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "mask training")
    assert ax.get_legend() is None
    assert all(float(t).is_integer() for t in ax.get_xticks())  # steps are whole numbers
    fig = plots.loss_curves({"clipped SGD": [1.0, 0.5], "Adam": [1.0, 0.7, 0.6]})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["clipped SGD", "Adam"]
    assert _renders(fig)
    with pytest.raises(ValueError, match="non-empty"):
        plots.loss_curves({"a": []})


# ----------------------------------------------------------------------------- one helper, the book's column


def test_panels_sizes_titles_and_hides_unused_cells():
    fig, axes = plots.panels(title="alone")
    assert len(axes) == 1 and axes[0].get_title() == "alone" and not fig.get_suptitle()
    assert tuple(fig.get_size_inches()) == pytest.approx(plots.FIGSIZE)
    fig, axes = plots.panels(["a", "b", "c"], title="all", ncols=2)
    assert [ax.get_title() for ax in axes] == ["a", "b", "c"] and fig.get_suptitle() == "all"
    assert sum(ax.get_visible() for ax in fig.axes) == 3 and len(fig.axes) == 4
    assert tuple(fig.get_size_inches()) == pytest.approx((plots.BOOK_WIDTH, 2 * plots.PANEL_HEIGHT))
    fig, _ = plots.panels(["named"], title="figure")  # one named panel: its name, and the figure's title
    assert fig.axes[0].get_title() == "named" and fig.get_suptitle() == "figure"
    fig, _ = plots.panels(20, ncols=10, width=10.0, height=2.0, keep_aspect=True)  # too wide: shrunk, same aspect
    assert tuple(fig.get_size_inches()) == pytest.approx((plots.BOOK_WIDTH, 2.0 * plots.BOOK_WIDTH / 10.0))
    fig, _ = plots.panels(width=12.0, height=3.0)
    assert tuple(fig.get_size_inches()) == pytest.approx((plots.BOOK_WIDTH, 3.0))
    with pytest.raises(ValueError, match="at least one panel"):
        plots.panels([])


def _texts(fig):
    """Every visible, non-empty text of a drawn figure."""
    fig.canvas.draw()
    return [t for t in fig.findobj(mpl.text.Text) if t.get_visible() and t.get_text().strip()]


def test_wide_figures_fit_the_book_column_with_legible_text():
    """The figures that used to grow with their content (10 image columns, 8 heatmap columns,
    4 mask layers, side-by-side panels) fit 700 pixels, with no text under SMALL_FONT points."""
    with mpl.rc_context():
        plots.set_style()
        g = torch.Generator().manual_seed(0)
        table = {f"attack {r}": {f"rule {c}": 0.1 * c for c in range(8)} for r in range(5)}
        figures = {
            "example_images": plots.example_images(torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10,
                                                   [f"class {c}" for c in range(10)], per_class=2),
            "metric_heatmap": plots.metric_heatmap(table, title="accuracy"),
            "label_heatmap": plots.label_heatmap({f"q = {q}": _shares(seed=q) for q in range(3)}, title="split"),
            "detection_rounds": plots.detection_rounds({"a": [{"round": 1, "fpr": 0.1, "fnr": 0.2}]}, title="t"),
        }
        for name, fig in figures.items():
            assert fig.get_size_inches()[0] <= plots.BOOK_WIDTH + 1e-9, name
            sizes = [t.get_fontsize() for t in _texts(fig)]
            assert sizes and min(sizes) >= plots.SMALL_FONT, (name, min(sizes))


def test_every_plots_name_the_chapters_use_exists():
    """The notebooks call ``plots.X``: every such X is still importable from the package."""
    import json
    import re
    from pathlib import Path

    used = set()
    for notebook in sorted(Path(__file__).resolve().parents[1].glob("book/*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        used |= set(re.findall(r"\bplots\.(\w+)", code))
    assert used, "no notebook uses plots: the glob is wrong"
    assert sorted(name for name in used if not hasattr(plots, name)) == []


def _grid(values, rows=("a", "b"), columns=("x", "y", "z")):
    import pandas as pd

    return pd.DataFrame(values, index=list(rows), columns=list(columns))


def test_accuracy_grid_colours_the_drop_and_marks_missing_cells():
    import numpy as np

    table = _grid([[0.85, 0.80, float("nan")], [0.10, 0.845, 0.60]])
    fig = plots.accuracy_grid(table, reference=0.85, title="t")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["85.0", "80.0", "·", "10.0", "84.5", "60.0"]
    drop = np.ma.masked_invalid(ax.collections[0].get_array()).reshape(2, 3)
    assert drop.mask[0, 2] and abs(drop[1, 0] - 75.0) < 1e-9  # points below the reference
    norm = ax.collections[0].norm
    assert norm(drop[0, 0]) != norm(drop[0, 1]) != norm(drop[1, 0])  # 0, 5 and 75 points: three colours
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert fig.get_size_inches()[0] <= plots.BOOK_WIDTH and _renders(fig)
    with pytest.raises(ValueError, match="reference"):
        plots.accuracy_grid(table, reference=85.0)


def test_rate_grids_one_panel_per_rate_in_percent():
    fpr = _grid([[0.0, 0.5, float("nan")], [1.0, 0.25, 0.0]])
    fig = plots.rate_grids({"FPR": fpr, "FNR": 1 - fpr.fillna(0)}, title="t")
    panels_ = [ax for ax in fig.axes if ax.get_title() in ("FPR", "FNR")]
    assert len(panels_) == 2
    assert [t.get_text() for t in panels_[0].texts] == ["0", "50", "·", "100", "25", "0"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.rate_grids({"FPR": fpr * 100})
    with pytest.raises(ValueError, match="empty"):
        plots.rate_grids({})


def test_seed_spread_and_round_bands_from_tables():
    import pandas as pd

    runs = pd.DataFrame({"attack": ["m", "m", "n", "n"] * 2, "defense": ["A"] * 4 + ["B"] * 4,
                         "seed": [0, 1] * 4, "test_acc": [0.5, 0.7, 0.8, 0.8, 0.1, 0.3, 0.9, 0.7]})
    fig = plots.seed_spread(runs, colors={"A": "#123456"})
    ax = fig.axes[0]
    from matplotlib.collections import LineCollection, PathCollection

    means = sorted(round(float(c.get_segments()[0][0][1]), 6) for c in ax.collections if isinstance(c, LineCollection))
    assert means == [0.2, 0.6, 0.8, 0.8]  # the means of the two seeds, one bar per (attack, rule)
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sorted(float(y) for c in dots for _, y in c.get_offsets()) == sorted(runs.test_acc)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"] and _renders(fig)
    rounds = pd.DataFrame({"defense": ["A"] * 4, "seed": [0, 0, 1, 1], "round": [1, 2, 1, 2],
                           "test_acc": [0.2, 0.4, 0.4, 0.8]})
    fig = plots.round_bands(rounds)
    [line] = fig.axes[0].lines
    assert list(line.get_ydata()) == pytest.approx([0.3, 0.6])
    with pytest.raises(ValueError, match="round_table"):
        plots.round_bands(rounds.drop(columns="round"))


def test_setting_curves_one_panel_per_attack_one_line_per_rule():
    import pandas as pd

    runs = pd.DataFrame({"attack": ["m"] * 5 + ["s"] * 2, "defense": ["A", "A", "A", "B", "B", "A", "B"],
                         "num_malicious": [80, 20, 40, 20, 40, 20, 20],
                         "test_acc": [0.5, 0.8, 0.7, 0.6, 0.4, 0.9, 0.1]})
    fig = plots.setting_curves(runs, "num_malicious", labels={"m": "Min-Max"}, xlabel="attackers")
    left, right = [ax for ax in fig.axes if ax.get_title()]
    assert (left.get_title(), right.get_title()) == ("Min-Max", "s")
    a, b = left.lines
    assert list(a.get_xdata()) == [20, 40, 80] and list(a.get_ydata()) == [0.8, 0.7, 0.5]  # sorted by the setting
    assert list(b.get_xdata()) == [20, 40]  # a rule not run at 80 has no point there
    assert fig.get_supxlabel() == "attackers" and _renders(fig)
    with pytest.raises(ValueError, match="run_table"):
        plots.setting_curves(runs, "num_clients")
