//! Process groups of a MoE Parallel Folding layout, exactly as Megatron-Core makes them.
//!
//! Megatron-Core lays the ranks out in a mixed-radix grid whose dimensions follow an order
//! string (default `"tp-cp-ep-dp-pp"`, the first name varying fastest). Attention layers use
//! the grid `TP x CP x DP x PP` (EP = 1) and expert layers the grid `ETP x EP x EDP x PP`
//! (CP = 1) over the **same** ranks: that is MoE Parallel Folding. A group of kind `"tp-dp"`
//! holds the ranks that differ only in their tp and dp coordinates.
//!
//! [`RankGenerator`] follows `megatron.core.parallel_state.RankGenerator` (and its helper
//! `generate_masked_orthogonal_rank_groups`); [`ParallelLayout::groups`] lists every group that
//! `initialize_model_parallel` creates, in the same order, under the names of [`GroupKind`].
//! Argument errors are reported as [`crate::Error::InvalidArgument`] naming the argument where
//! Megatron would fail an assertion.

use crate::error::{ensure, invalid, Result};

/// The most ranks a [`ParallelLayout`] lists (about 20 kinds x this many `usize`s).
pub const MAX_LISTED_RANKS: usize = 1 << 20;

/// The five dimensions of Megatron's rank grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Tp,
    Cp,
    Ep,
    Dp,
    Pp,
}

impl Dim {
    pub const ALL: [Dim; 5] = [Dim::Tp, Dim::Cp, Dim::Ep, Dim::Dp, Dim::Pp];

    pub fn name(self) -> &'static str {
        match self {
            Dim::Tp => "tp",
            Dim::Cp => "cp",
            Dim::Ep => "ep",
            Dim::Dp => "dp",
            Dim::Pp => "pp",
        }
    }

    fn parse(s: &str, arg: &str) -> Result<Self> {
        match s {
            "tp" => Ok(Dim::Tp),
            "cp" => Ok(Dim::Cp),
            "ep" => Ok(Dim::Ep),
            "dp" => Ok(Dim::Dp),
            "pp" => Ok(Dim::Pp),
            other => Err(invalid(
                arg,
                format!("unknown parallelism '{other}' (expected tp, cp, ep, dp or pp)"),
            )),
        }
    }
}

/// Parses a `-`-separated list of dimension names (case-insensitive), rejecting repeats.
fn parse_dims(s: &str, arg: &str) -> Result<Vec<Dim>> {
    let lower = s.trim().to_ascii_lowercase();
    ensure(!lower.is_empty(), arg, || "must not be empty".into())?;
    let mut dims = Vec::new();
    for tok in lower.split('-') {
        let d = Dim::parse(tok.trim(), arg)?;
        ensure(!dims.contains(&d), arg, || {
            format!("'{}' appears twice in '{s}'", d.name())
        })?;
        dims.push(d);
    }
    Ok(dims)
}

/// One rank grid: sizes per dimension and the order of the dimensions (first fastest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankGenerator {
    order: Vec<Dim>,
    sizes: Vec<usize>,
    world_size: usize,
}

impl RankGenerator {
    /// `RankGenerator(tp, ep, dp, pp, cp, order)`. Dimensions missing from `order` must have
    /// size 1 and are appended at the end, as Megatron does.
    pub fn new(tp: usize, ep: usize, dp: usize, pp: usize, cp: usize, order: &str) -> Result<Self> {
        for (name, v) in [("tp", tp), ("ep", ep), ("dp", dp), ("pp", pp), ("cp", cp)] {
            ensure(v >= 1, name, || format!("must be >= 1, got {v}"))?;
        }
        ensure(ep == 1 || cp == 1, "ep", || {
            format!("ep ({ep}) and cp ({cp}) cannot both be > 1 in one rank grid")
        })?;
        let size_of = |d: Dim| match d {
            Dim::Tp => tp,
            Dim::Cp => cp,
            Dim::Ep => ep,
            Dim::Dp => dp,
            Dim::Pp => pp,
        };
        let mut dims = parse_dims(order, "order")?;
        for d in Dim::ALL {
            if !dims.contains(&d) {
                ensure(size_of(d) == 1, "order", || {
                    format!(
                        "the size of {} is {}, but '{order}' does not place it",
                        d.name(),
                        size_of(d)
                    )
                })?;
                dims.push(d);
            }
        }
        let sizes: Vec<usize> = dims.iter().map(|&d| size_of(d)).collect();
        let world_size = sizes
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| invalid("world_size", "overflows"))?;
        Ok(Self {
            order: dims,
            sizes,
            world_size,
        })
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The full order, with the appended dimensions (e.g. `"tp-cp-ep-dp-pp"`).
    pub fn order(&self) -> String {
        self.order
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join("-")
    }

    fn mask(&self, token: &str) -> Result<Vec<bool>> {
        let dims = parse_dims(token, "token")?;
        let mut mask = vec![false; self.order.len()];
        for d in dims {
            let i =
                self.order.iter().position(|&o| o == d).ok_or_else(|| {
                    invalid("token", format!("'{}' is not in the order", d.name()))
                })?;
            mask[i] = true;
        }
        Ok(mask)
    }

    /// Every group of kind `token` (e.g. `"tp-dp"`), in Megatron's order: group `g` decomposes
    /// over the unmasked dimensions, member `r` over the masked ones, first dimension fastest.
    pub fn get_ranks(&self, token: &str) -> Result<Vec<Vec<usize>>> {
        let mask = self.mask(token)?;
        Ok(self.groups_for_mask(&mask))
    }

    fn groups_for_mask(&self, mask: &[bool]) -> Vec<Vec<usize>> {
        let grid = GroupGrid::new(&self.sizes, mask);
        (0..self.world_size / grid.size)
            .map(|g| {
                let base = grid.base(g);
                (0..grid.size).map(|r| base + grid.member(r)).collect()
            })
            .collect()
    }
}

/// The groups of one kind on the rank grid: the masked dimensions index a group's members,
/// the others the groups (first dimension fastest), so rank = base(group) + member(index).
struct GroupGrid {
    in_shape: Vec<usize>,
    in_stride: Vec<usize>,
    out_shape: Vec<usize>,
    out_stride: Vec<usize>,
    /// Ranks in a group.
    size: usize,
}

impl GroupGrid {
    fn new(sizes: &[usize], mask: &[bool]) -> Self {
        let mut g = GroupGrid {
            in_shape: Vec::new(),
            in_stride: Vec::new(),
            out_shape: Vec::new(),
            out_stride: Vec::new(),
            size: 1,
        };
        let mut stride = 1usize;
        for (&s, &m) in sizes.iter().zip(mask) {
            if m {
                g.in_shape.push(s);
                g.in_stride.push(stride);
            } else {
                g.out_shape.push(s);
                g.out_stride.push(stride);
            }
            stride *= s;
        }
        g.size = g.in_shape.iter().product();
        g
    }

    /// The rank offset of mixed-radix `index` over `shape` (first digit fastest).
    fn decompose(index: usize, shape: &[usize], strides: &[usize]) -> usize {
        let mut rem = index;
        let mut off = 0;
        for (&s, &st) in shape.iter().zip(strides) {
            off += (rem % s) * st;
            rem /= s;
        }
        off
    }

    fn base(&self, group: usize) -> usize {
        Self::decompose(group, &self.out_shape, &self.out_stride)
    }

    fn member(&self, index: usize) -> usize {
        Self::decompose(index, &self.in_shape, &self.in_stride)
    }
}

/// Splits each group of `ranks` hierarchically, as Megatron's `create_hierarchical_groups`:
/// level `l` of sizes `[s0, s1, ...]` groups the members whose index differs only in the
/// `l`-th mixed-radix digit (first size fastest).
pub fn hierarchical_groups(ranks: &[usize], sizes: &[usize]) -> Result<Vec<Vec<Vec<usize>>>> {
    let prod: usize = sizes.iter().product();
    ensure(
        prod == ranks.len() && sizes.iter().all(|&s| s >= 1),
        "hierarchical sizes",
        || {
            format!(
                "{sizes:?} must be positive with a product equal to the group size {}",
                ranks.len()
            )
        },
    )?;
    let mut levels = Vec::with_capacity(sizes.len());
    for level in 0..sizes.len() {
        let u: usize = sizes[..level].iter().product();
        let s = sizes[level];
        let l: usize = sizes[level + 1..].iter().product();
        let mut groups = Vec::with_capacity(l * u);
        for li in 0..l {
            for ui in 0..u {
                groups.push((0..s).map(|si| ranks[li * s * u + si * u + ui]).collect());
            }
        }
        levels.push(groups);
    }
    Ok(levels)
}

/// The group kinds `initialize_model_parallel` creates (its `group_desc` in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Data parallel with context parallel (`DATA_PARALLEL_GROUP_WITH_CP`): the gradient
    /// reduction group of the non-expert parameters.
    DpCp,
    /// One distributed-optimizer instance inside a dp-cp group
    /// (`INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`); only with several instances.
    IntraPartialDpCp,
    Dp,
    Cp,
    /// Level `i` of the hierarchical context-parallel groups (`HIERARCHICAL_CONTEXT_PARALLEL_GROUP_L{i}`).
    HierarchicalCp(usize),
    /// Tensor x pipeline (`MODEL_PARALLEL_GROUP`).
    TpPp,
    Tp,
    Pp,
    /// First and last rank of each pipeline group (`EMBEDDING_GROUP`).
    Embedding,
    /// First rank of each pipeline group (`POSITION_EMBEDDING_GROUP`).
    PositionEmbedding,
    TpDpCp,
    TpDp,
    TpCp,
    /// Expert parallel (`EXPERT_MODEL_PARALLEL_GROUP`).
    Ep,
    /// Expert tensor parallel (`EXPERT_TENSOR_PARALLEL_GROUP`).
    Etp,
    /// Expert tensor x expert parallel (`EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP`).
    EtpEp,
    /// Expert tensor x expert x pipeline (`EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP`).
    EtpEpPp,
    /// Expert data parallel (`EXPERT_DATA_PARALLEL_GROUP`): the expert gradients' group.
    Edp,
    /// Inside one optimizer instance / across instances of an expert-dp group.
    IntraPartialEdp,
    InterPartialEdp,
    /// `INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP`.
    IntraDistOptInstance,
}

impl GroupKind {
    /// The public name of the kind (the key of `moerail.rank_groups`).
    pub fn name(self) -> String {
        match self {
            GroupKind::DpCp => "dp-cp".into(),
            GroupKind::IntraPartialDpCp => "intra-partial-dp-cp".into(),
            GroupKind::Dp => "dp".into(),
            GroupKind::Cp => "cp".into(),
            GroupKind::HierarchicalCp(l) => format!("hierarchical-cp-{l}"),
            GroupKind::TpPp => "tp-pp".into(),
            GroupKind::Tp => "tp".into(),
            GroupKind::Pp => "pp".into(),
            GroupKind::Embedding => "embedding".into(),
            GroupKind::PositionEmbedding => "position-embedding".into(),
            GroupKind::TpDpCp => "tp-dp-cp".into(),
            GroupKind::TpDp => "tp-dp".into(),
            GroupKind::TpCp => "tp-cp".into(),
            GroupKind::Ep => "ep".into(),
            GroupKind::Etp => "etp".into(),
            GroupKind::EtpEp => "tp-ep".into(),
            GroupKind::EtpEpPp => "tp-ep-pp".into(),
            GroupKind::Edp => "edp".into(),
            GroupKind::IntraPartialEdp => "intra-partial-edp".into(),
            GroupKind::InterPartialEdp => "inter-partial-edp".into(),
            GroupKind::IntraDistOptInstance => "intra-dist-opt-instance".into(),
        }
    }
}

/// A parallel layout over `world_size` ranks: attention `TP x CP x DP x PP` and experts
/// `ETP x EP x EDP x PP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParallelLayout {
    pub world_size: usize,
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    pub ep: usize,
    pub etp: usize,
    pub dp: usize,
    pub edp: usize,
    pub num_distributed_optimizer_instances: usize,
    pub hierarchical_cp: Vec<usize>,
    attn: RankGenerator,
    expert: RankGenerator,
}

/// Options of [`ParallelLayout::with_options`] beyond the sizes.
#[derive(Clone, Debug, Default)]
pub struct LayoutOptions {
    /// `num_distributed_optimizer_instances` (default 1).
    pub num_distributed_optimizer_instances: Option<usize>,
    /// `hierarchical_context_parallel_sizes` (default none).
    pub hierarchical_cp: Vec<usize>,
}

impl ParallelLayout {
    /// Checks the sizes as `initialize_model_parallel` does. `etp` defaults to `tp`.
    pub fn new(
        world_size: usize,
        tp: usize,
        cp: usize,
        pp: usize,
        ep: usize,
        etp: Option<usize>,
        order: &str,
    ) -> Result<Self> {
        Self::with_options(
            world_size,
            tp,
            cp,
            pp,
            ep,
            etp,
            order,
            &LayoutOptions::default(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    /// A layout of `world_size` ranks; every size is checked (errors name the argument).
    pub fn with_options(
        world_size: usize,
        tp: usize,
        cp: usize,
        pp: usize,
        ep: usize,
        etp: Option<usize>,
        order: &str,
        opts: &LayoutOptions,
    ) -> Result<Self> {
        ensure(world_size >= 1, "world_size", || {
            format!("must be >= 1, got {world_size}")
        })?;
        // The layout lists every rank of every group: the world is capped so that a huge one is
        // an error naming `world_size`, not an allocation failure that aborts the process.
        ensure(world_size <= MAX_LISTED_RANKS, "world_size", || {
            format!("{world_size} ranks are more than the {MAX_LISTED_RANKS} a layout lists")
        })?;
        let etp = etp.unwrap_or(tp);
        for (name, v) in [("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)] {
            ensure(v >= 1, name, || format!("must be >= 1, got {v}"))?;
        }
        let model = tp
            .checked_mul(cp)
            .and_then(|x| x.checked_mul(pp))
            .unwrap_or(usize::MAX);
        ensure(world_size % model == 0, "world_size", || {
            format!("{world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {model}")
        })?;
        let expert = etp
            .checked_mul(ep)
            .and_then(|x| x.checked_mul(pp))
            .unwrap_or(usize::MAX);
        ensure(world_size % expert == 0, "world_size", || {
            format!("{world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = {expert}")
        })?;
        let dp = world_size / model;
        let edp = world_size / expert;
        let attn = RankGenerator::new(tp, 1, dp, pp, cp, order)?;
        let expert_gen = RankGenerator::new(etp, ep, edp, pp, 1, order)?;
        ensure(
            attn.order().ends_with("pp") || pp == 1 || edp == dp,
            "order",
            || {
                format!(
                    "with '{order}' (pp not last) the attention dp ({dp}) must equal the expert dp ({edp})"
                )
            },
        )?;
        let inst = opts.num_distributed_optimizer_instances.unwrap_or(1);
        ensure(inst >= 1, "num_distributed_optimizer_instances", || {
            "must be >= 1".into()
        })?;
        ensure(
            (dp * cp) % inst == 0,
            "num_distributed_optimizer_instances",
            || format!("dp*cp = {} is not divisible by {inst}", dp * cp),
        )?;
        ensure(
            edp % inst == 0,
            "num_distributed_optimizer_instances",
            || format!("the expert dp {edp} is not divisible by {inst}"),
        )?;
        if !opts.hierarchical_cp.is_empty() {
            let p: usize = opts.hierarchical_cp.iter().product();
            ensure(
                p == cp && opts.hierarchical_cp.iter().all(|&s| s >= 1),
                "hierarchical_context_parallel_sizes",
                || {
                    format!(
                        "{:?} must multiply to the context parallel size {cp}",
                        opts.hierarchical_cp
                    )
                },
            )?;
        }
        let layout = Self {
            world_size,
            tp,
            cp,
            pp,
            ep,
            etp,
            dp,
            edp,
            num_distributed_optimizer_instances: inst,
            hierarchical_cp: opts.hierarchical_cp.clone(),
            attn,
            expert: expert_gen,
        };
        ensure(
            layout.attn.get_ranks("pp")? == layout.expert.get_ranks("pp")?,
            "order",
            || {
                format!(
                    "'{order}' gives different pipeline groups to attention and experts (put pp last)"
                )
            },
        )?;
        Ok(layout)
    }

    /// The attention grid (`TP x CP x DP x PP`).
    pub fn attention(&self) -> &RankGenerator {
        &self.attn
    }

    /// The expert grid (`ETP x EP x EDP x PP`).
    pub fn expert(&self) -> &RankGenerator {
        &self.expert
    }

    /// Every group `initialize_model_parallel` creates, kind by kind, in its order.
    ///
    pub fn groups(&self) -> Result<Vec<(GroupKind, Vec<Vec<usize>>)>> {
        let a = &self.attn;
        let e = &self.expert;
        let inst = self.num_distributed_optimizer_instances;
        let mut out = Vec::new();
        let dp_cp = a.get_ranks("dp-cp")?;
        if inst > 1 {
            let intra = dp_cp[0].len() / inst;
            let parts = dp_cp
                .iter()
                .flat_map(|g| g.chunks(intra).map(|c| c.to_vec()))
                .collect();
            out.push((GroupKind::DpCp, dp_cp));
            out.push((GroupKind::IntraPartialDpCp, parts));
        } else {
            out.push((GroupKind::DpCp, dp_cp));
        }
        out.push((GroupKind::Dp, a.get_ranks("dp")?));
        let cp = a.get_ranks("cp")?;
        if !self.hierarchical_cp.is_empty() {
            let mut levels: Vec<Vec<Vec<usize>>> = vec![Vec::new(); self.hierarchical_cp.len()];
            for g in &cp {
                for (l, groups) in hierarchical_groups(g, &self.hierarchical_cp)?
                    .into_iter()
                    .enumerate()
                {
                    levels[l].extend(groups);
                }
            }
            out.push((GroupKind::Cp, cp));
            for (l, groups) in levels.into_iter().enumerate() {
                out.push((GroupKind::HierarchicalCp(l), groups));
            }
        } else {
            out.push((GroupKind::Cp, cp));
        }
        out.push((GroupKind::TpPp, a.get_ranks("tp-pp")?));
        out.push((GroupKind::Tp, a.get_ranks("tp")?));
        let pp = a.get_ranks("pp")?;
        let embedding = pp
            .iter()
            .map(|g| {
                if g.len() == 1 {
                    vec![g[0]]
                } else {
                    vec![g[0], g[g.len() - 1]]
                }
            })
            .collect();
        let position = pp.iter().map(|g| vec![g[0]]).collect();
        out.push((GroupKind::Pp, pp));
        out.push((GroupKind::Embedding, embedding));
        out.push((GroupKind::PositionEmbedding, position));
        out.push((GroupKind::TpDpCp, a.get_ranks("tp-dp-cp")?));
        out.push((GroupKind::TpDp, a.get_ranks("tp-dp")?));
        out.push((GroupKind::TpCp, a.get_ranks("tp-cp")?));
        out.push((GroupKind::Ep, e.get_ranks("ep")?));
        out.push((GroupKind::Etp, e.get_ranks("tp")?));
        out.push((GroupKind::EtpEp, e.get_ranks("tp-ep")?));
        let etp_ep_pp = e.get_ranks("tp-ep-pp")?;
        out.push((GroupKind::EtpEpPp, etp_ep_pp.clone()));
        let edp = e.get_ranks("dp")?;
        if inst > 1 {
            let intra = self.edp / inst;
            let (mut intra_groups, mut inter_groups) = (Vec::new(), Vec::new());
            for g in &edp {
                let mut levels = hierarchical_groups(g, &[intra, inst])?.into_iter();
                intra_groups.extend(levels.next().unwrap_or_default());
                inter_groups.extend(levels.next().unwrap_or_default());
            }
            out.push((GroupKind::Edp, edp));
            out.push((GroupKind::IntraPartialEdp, intra_groups));
            out.push((GroupKind::InterPartialEdp, inter_groups));
        } else {
            out.push((GroupKind::Edp, edp));
        }
        // Consecutive expert model-parallel groups, `edp / instances` at a time.
        let per = self.edp / inst;
        let instances = etp_ep_pp.chunks(per).map(|c| c.concat()).collect();
        out.push((GroupKind::IntraDistOptInstance, instances));
        Ok(out)
    }
}

/// How a group of ranks sits on nodes of `devices_per_node` consecutive ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Ranks in the group.
    pub size: usize,
    /// Most nodes any group of the kind touches.
    pub nodes: usize,
    /// Fewest ranks of one group that share a node (the intra-node share of the slowest
    /// member's peers is `(min_per_node - 1) / (size - 1)`).
    pub min_per_node: usize,
}

impl Span {
    /// Whether every group lies inside one node.
    pub fn intra_node(&self) -> bool {
        self.nodes <= 1
    }
}

impl RankGenerator {
    /// The worst node span over all groups of kind `token`, without building the group lists.
    pub fn span(&self, token: &str, devices_per_node: usize) -> Result<Span> {
        ensure(devices_per_node >= 1, "devices_per_node", || {
            "must be >= 1".into()
        })?;
        let mask = self.mask(token)?;
        let grid = GroupGrid::new(&self.sizes, &mask);
        let size = grid.size;
        let groups = self.world_size / size;
        let mut members: Vec<usize> = Vec::with_capacity(size);
        let (mut worst_nodes, mut worst_min) = (0usize, usize::MAX);
        // Groups of one kind are translates of each other, and node boundaries repeat with
        // the fastest grid dimensions: the first groups (up to 32) show the worst case.
        for g in 0..groups.min(32) {
            let base = grid.base(g);
            members.clear();
            members.extend((0..size).map(|r| (base + grid.member(r)) / devices_per_node));
            members.sort_unstable();
            let (mut nodes, mut min_run, mut run) = (1usize, usize::MAX, 1usize);
            for w in members.windows(2) {
                if w[0] == w[1] {
                    run += 1;
                } else {
                    nodes += 1;
                    min_run = min_run.min(run);
                    run = 1;
                }
            }
            min_run = min_run.min(run);
            worst_nodes = worst_nodes.max(nodes);
            worst_min = worst_min.min(min_run);
        }
        Ok(Span {
            size,
            nodes: worst_nodes.max(1),
            min_per_node: if worst_min == usize::MAX {
                size
            } else {
                worst_min
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docstring_example_of_megatron() {
        // parallel_size [tp, dp, pp] = [2, 3, 4], mask dp -> dp groups.
        let g = RankGenerator::new(2, 1, 3, 4, 1, "tp-dp-pp").unwrap();
        let dp = g.get_ranks("dp").unwrap();
        assert_eq!(dp.len(), 8);
        assert_eq!(dp[0], vec![0, 2, 4]);
        assert_eq!(dp[1], vec![1, 3, 5]);
        assert_eq!(dp[7], vec![19, 21, 23]);
    }

    #[test]
    fn folding_layout_128() {
        let l = ParallelLayout::new(128, 2, 1, 8, 8, Some(1), "tp-cp-ep-dp-pp").unwrap();
        assert_eq!((l.dp, l.edp), (8, 2));
        let groups = l.groups().unwrap();
        let get = |k: GroupKind| groups.iter().find(|(g, _)| *g == k).unwrap().1.clone();
        assert_eq!(get(GroupKind::Tp)[1], vec![2, 3]);
        assert_eq!(get(GroupKind::Ep)[0], (0..8).collect::<Vec<_>>());
        assert_eq!(get(GroupKind::Edp)[0], vec![0, 8]);
        assert_eq!(get(GroupKind::Pp)[0], vec![0, 16, 32, 48, 64, 80, 96, 112]);
        assert_eq!(get(GroupKind::Embedding)[0], vec![0, 112]);
        // Every kind partitions the ranks.
        for (k, gs) in &groups {
            if matches!(k, GroupKind::Embedding | GroupKind::PositionEmbedding) {
                continue;
            }
            let mut all: Vec<usize> = gs.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..128).collect::<Vec<_>>(), "{k:?}");
        }
    }

    #[test]
    fn errors_name_the_argument() {
        let e = ParallelLayout::new(100, 2, 1, 8, 8, Some(1), "tp-cp-ep-dp-pp").unwrap_err();
        assert!(e.to_string().starts_with("world_size:"), "{e}");
        let e = ParallelLayout::new(16, 2, 1, 2, 2, None, "tp-xx-dp-pp").unwrap_err();
        assert!(e.to_string().starts_with("order:"), "{e}");
        let e = ParallelLayout::new(16, 2, 2, 2, 1, None, "tp-dp-pp").unwrap_err();
        assert!(e.to_string().contains("cp"), "{e}");
        let e = ParallelLayout::new(16, 2, 1, 2, 1, None, "tp-tp-dp-pp").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn hierarchical_matches_megatron_docstring() {
        let ranks: Vec<usize> = (0..16).collect();
        let lv = hierarchical_groups(&ranks, &[2, 2, 4]).unwrap();
        assert_eq!(lv[0][0], vec![0, 1]);
        assert_eq!(lv[0][7], vec![14, 15]);
        assert_eq!(lv[1][0], vec![0, 2]);
        assert_eq!(lv[1][1], vec![1, 3]);
        assert_eq!(lv[1][2], vec![4, 6]);
        assert_eq!(lv[2][0], vec![0, 4, 8, 12]);
        assert_eq!(lv[2][3], vec![3, 7, 11, 15]);
    }

    #[test]
    fn spans() {
        let l = ParallelLayout::new(128, 2, 1, 8, 8, Some(1), "tp-cp-ep-dp-pp").unwrap();
        let ep = l.expert().span("ep", 8).unwrap();
        assert!(ep.intra_node());
        let dp = l.attention().span("dp", 8).unwrap();
        assert_eq!((dp.size, dp.nodes, dp.min_per_node), (8, 2, 4));
        let pp = l.attention().span("pp", 8).unwrap();
        assert_eq!((pp.nodes, pp.min_per_node), (8, 1));
    }

    #[test]
    fn a_huge_world_is_an_error_not_an_abort() {
        let e = ParallelLayout::new(1 << 40, 1, 1, 1, 1, None, "tp-cp-ep-dp-pp").unwrap_err();
        assert!(e.to_string().starts_with("world_size: "), "{e}");
    }
}
