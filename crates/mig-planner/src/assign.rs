//! Concrete decisions: an option per GPU and a node per demand. The greedy planner builds one from
//! scratch; the ILP's class-level answer is turned into one here; both end in [`realise`], which
//! places every demand on real free instances and cleans up changes that serve nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::problem::{DrainCandidates, Problem, global_profile};

/// Instances a demand takes: (GPU, global profile, count).
pub(crate) type Taken = Vec<(usize, usize, u16)>;
/// Where a demand landed: its node and what it takes.
pub(crate) type Placement = Option<(usize, Taken)>;

/// Per GPU, which option; per demand, where the solver meant it to go.
#[derive(Clone, Debug, Default)]
pub(crate) struct Decision {
    pub option: Vec<usize>,
    pub prefer_node: Vec<Option<usize>>,
    /// Per demand, the capacity groups the ILP put it in (tried first; empty for greedy).
    pub prefer_group: Vec<Vec<usize>>,
}

/// Where each demand landed: node and, per GPU, the instances it takes (global profile index, count).
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    pub option: Vec<usize>,
    /// demand → (node, [(gpu, global profile, count)])
    pub placed: Vec<Placement>,
    /// Nodes whose changes were dropped to honour the node budget (aggregated model).
    pub budget_reverted: BTreeSet<usize>,
}

/// Free instances under a set of options, minus what is already taken: per GPU, summed per node,
/// and, per capacity group and profile, the nodes that have any (in node order), so that first-fit
/// looks at nodes that might fit instead of every node for every demand.
struct Capacity<'a, 'c> {
    p: &'a Problem<'c>,
    option: Vec<usize>,
    used: Vec<Vec<u16>>,
    /// Per node and profile: free instances of its GPUs under `option`, less `used`.
    node_avail: Vec<Vec<u32>>,
    /// Per group and profile: the nodes whose `node_avail` is not zero.
    offering: Vec<Vec<BTreeSet<usize>>>,
    node_group: Vec<usize>,
    /// Per node: whether one of its GPUs changes under `option`; how many do, and which.
    node_changed: Vec<bool>,
    changed_nodes: usize,
    changing: BTreeSet<usize>,
    /// Nodes touched (instances taken, options changed), in order.
    touched: Vec<usize>,
}

impl<'a, 'c> Capacity<'a, 'c> {
    fn new(p: &'a Problem<'c>, option: Vec<usize>) -> Self {
        let mut cap = Capacity {
            p,
            option,
            used: vec![vec![0; p.profiles.len()]; p.gpus.len()],
            node_avail: vec![vec![0; p.profiles.len()]; p.nodes.len()],
            offering: vec![vec![BTreeSet::new(); p.profiles.len()]; p.groups.len()],
            node_group: node_groups(p),
            node_changed: vec![false; p.nodes.len()],
            changed_nodes: 0,
            changing: BTreeSet::new(),
            touched: Vec::new(),
        };
        for n in 0..p.nodes.len() {
            cap.recount(n);
        }
        cap
    }

    fn avail(&self, g: usize, option: usize, q: usize) -> u16 {
        self.p.gpus[g].options[option].free[q].saturating_sub(self.used[g][q])
    }

    /// Recompute node `n`'s sums, index entries and changed flag from its GPUs.
    fn recount(&mut self, n: usize) {
        let p = self.p;
        for q in 0..p.profiles.len() {
            let have: u32 = p.nodes[n]
                .gpus
                .iter()
                .map(|g| u32::from(self.avail(*g, self.option[*g], q)))
                .sum();
            self.node_avail[n][q] = have;
            let offering = &mut self.offering[self.node_group[n]][q];
            if have > 0 {
                offering.insert(n);
            } else {
                offering.remove(&n);
            }
        }
        let changed = p.nodes[n]
            .gpus
            .iter()
            .any(|g| p.gpus[*g].options[self.option[*g]].changed);
        if changed != self.node_changed[n] {
            self.node_changed[n] = changed;
            if changed {
                self.changed_nodes += 1;
                self.changing.insert(n);
            } else {
                self.changed_nodes -= 1;
                self.changing.remove(&n);
            }
        }
    }

    /// What the node still lacks for `req`: Σ_q max(0, need - available).
    fn missing(&self, node: usize, req: &[(usize, u16)]) -> u32 {
        req.iter()
            .map(|(q, need)| u32::from(*need).saturating_sub(self.node_avail[node][*q]))
            .sum()
    }

    /// [`missing`](Self::missing) if the node's GPUs took the options in `trial` (its GPUs, in
    /// order) instead.
    fn missing_with(&self, node: usize, trial: &[usize], req: &[(usize, u16)]) -> u32 {
        req.iter()
            .map(|(q, need)| {
                let have: u32 = self.p.nodes[node]
                    .gpus
                    .iter()
                    .zip(trial)
                    .map(|(g, o)| u32::from(self.avail(*g, *o, *q)))
                    .sum();
                u32::from(*need).saturating_sub(have)
            })
            .sum()
    }

    /// The first node, in the order of `groups` and then node order, that is schedulable and has
    /// what `req` asks for.
    fn first_fit(&self, groups: &[usize], req: &[(usize, u16)]) -> Option<usize> {
        let (q, _) = req.first()?;
        groups.iter().find_map(|g| {
            self.offering[*g][*q]
                .iter()
                .copied()
                .find(|n| self.p.nodes[*n].schedulable && self.missing(*n, req) == 0)
        })
    }

    /// Options for node `n`'s GPUs (in order) under which it has what `req` asks for, changing one
    /// GPU at a time to the option that leaves least missing and never dropping what this plan
    /// already put on a GPU, or `None`.
    fn reconfigure(&self, n: usize, req: &[(usize, u16)]) -> Option<Vec<usize>> {
        let p = self.p;
        let gpus = &p.nodes[n].gpus;
        let mut trial: Vec<usize> = gpus.iter().map(|g| self.option[*g]).collect();
        let mut missing = self.missing(n, req);
        for (k, g) in gpus.iter().enumerate() {
            if missing == 0 {
                break;
            }
            let mut best = (missing, trial[k]);
            for (o, opt) in p.gpus[*g].options.iter().enumerate() {
                if opt.drain || (0..p.profiles.len()).any(|q| opt.free[q] < self.used[*g][q]) {
                    continue;
                }
                let saved = trial[k];
                trial[k] = o;
                let m = self.missing_with(n, &trial, req);
                trial[k] = saved;
                if m < best.0 {
                    best = (m, o);
                }
            }
            trial[k] = best.1;
            missing = best.0;
        }
        (missing == 0).then_some(trial)
    }

    /// Node `node`'s GPUs take the options in `trial` (its GPUs, in order).
    fn set_options(&mut self, node: usize, trial: &[usize]) {
        for (g, o) in self.p.nodes[node].gpus.iter().zip(trial) {
            self.option[*g] = *o;
        }
        self.recount(node);
        self.touched.push(node);
    }

    /// Take `req` from the node's GPUs in index order (caller checked it fits).
    fn take(&mut self, node: usize, req: &[(usize, u16)]) -> Taken {
        let mut taken = Vec::new();
        for (q, need) in req {
            let mut left = *need;
            for g in &self.p.nodes[node].gpus {
                let n = left.min(self.avail(*g, self.option[*g], *q));
                if n > 0 {
                    self.used[*g][*q] += n;
                    taken.push((*g, *q, n));
                    left -= n;
                }
            }
        }
        self.recount(node);
        self.touched.push(node);
        taken
    }
}

/// A demand's request and groups: demands alike in both fit on the same nodes.
type RequestKey<'a> = (&'a [(usize, u16)], &'a [usize]);
/// Nodes as (rank of the node's group among a demand's groups, node): first-fit order.
type OpenNodes = BTreeSet<(usize, usize)>;

/// Each node's capacity group.
fn node_groups(p: &Problem<'_>) -> Vec<usize> {
    let mut node_group = vec![0; p.nodes.len()];
    for (gi, group) in p.groups.iter().enumerate() {
        for n in &group.nodes {
            node_group[*n] = gi;
        }
    }
    node_group
}

fn node_changed(p: &Problem<'_>, option: &[usize], node: usize) -> bool {
    p.nodes[node]
        .gpus
        .iter()
        .any(|g| p.gpus[*g].options[option[*g]].changed)
}

fn eligible_nodes<'a>(p: &'a Problem<'_>, d: usize) -> impl Iterator<Item = usize> + 'a {
    p.demands[d]
        .groups
        .iter()
        .flat_map(move |g| p.groups[*g].nodes.iter().copied())
}

/// First-fit greedy: demands in priority order; each goes to the first eligible node where it fits,
/// reconfiguring that node's changeable GPUs (never draining) when that makes it fit, within the
/// node budget.
pub(crate) fn greedy(p: &Problem<'_>) -> Decision {
    let keep_all = Decision {
        option: vec![0; p.gpus.len()],
        prefer_node: vec![None; p.demands.len()],
        prefer_group: vec![Vec::new(); p.demands.len()],
    };
    greedy_from(p, &keep_all)
}

/// Greedy, starting from another decision: its options stay and its placements (`prefer_node`) are
/// replayed first; the remaining demands are placed greedily, changing more GPUs where that helps.
/// Used to complete an ILP answer that the aggregated model could not place whole.
pub(crate) fn greedy_from(p: &Problem<'_>, start: &Decision) -> Decision {
    let mut prefer_node = vec![None; p.demands.len()];
    let mut cap = Capacity::new(p, start.option.clone());
    let order = p.demand_order();
    for &d in &order {
        if let Some(n) = start.prefer_node[d]
            && cap.missing(n, &p.demands[d].req) == 0
        {
            cap.take(n, &p.demands[d].req);
            prefer_node[d] = Some(n);
        }
    }
    let max_nodes = p.policy.budgets.max_nodes_changed.map(|b| b as usize);
    let mut open: HashMap<RequestKey<'_>, OpenNodes> = HashMap::new();
    let mut seen = cap.touched.len();
    // Upper bound of what each node could offer per profile: skip nodes that can never fit.
    let ceiling: Vec<Vec<u16>> = p
        .nodes
        .iter()
        .map(|n| {
            (0..p.profiles.len())
                .map(|q| n.gpus.iter().map(|g| p.gpus[*g].options.most_free(q, true)).sum())
                .collect()
        })
        .collect();
    let node_group = node_groups(p);
    // Where node `n` comes in the first-fit order of a demand's groups, if it may host `req`.
    let first_fit_rank = |groups: &[usize], req: &[(usize, u16)], n: usize| {
        let fits = p.nodes[n].schedulable && req.iter().all(|(q, c)| ceiling[n][*q] >= *c);
        let rank = groups.iter().position(|g| *g == node_group[n])?;
        fits.then_some((rank, n))
    };
    for &d in &order {
        let demand = &p.demands[d];
        if demand.evicted_from.is_some() || prefer_node[d].is_some() {
            continue;
        }
        // Existing free instances first, anywhere; only then reconfigure.
        if let Some(n) = cap.first_fit(&demand.groups, &demand.req) {
            cap.take(n, &demand.req);
            prefer_node[d] = Some(n);
            continue;
        }
        // Nodes where this request failed and that nothing touched since fail again (taking
        // instances and changing options only ever narrow what a node can still become, and the
        // node budget only fills up): per request and groups, the nodes still open, in first-fit
        // order; a node leaves when it fails and comes back when it is touched.
        let key = (demand.req.as_slice(), demand.groups.as_slice());
        for n in cap.touched[seen..].iter().copied().collect::<BTreeSet<usize>>() {
            for ((req, groups), nodes) in &mut open {
                if let Some(at) = first_fit_rank(groups, req, n) {
                    nodes.insert(at);
                }
            }
        }
        seen = cap.touched.len();
        let nodes = open.entry(key).or_insert_with(|| {
            eligible_nodes(p, d)
                .filter_map(|n| first_fit_rank(&demand.groups, &demand.req, n))
                .collect()
        });
        // With the node budget spent, only nodes that change already may change more (and the
        // others stay open: the budget frees up when a node's change is undone).
        let tried: Vec<(usize, usize)> = if max_nodes.is_some_and(|b| cap.changed_nodes >= b) {
            let mut changing: Vec<(usize, usize)> = cap
                .changing
                .iter()
                .filter_map(|n| first_fit_rank(&demand.groups, &demand.req, *n))
                .filter(|at| nodes.contains(at))
                .collect();
            changing.sort_unstable();
            changing
        } else {
            nodes.iter().copied().collect()
        };
        let mut found = None;
        for (rank, n) in tried {
            if let Some(trial) = cap.reconfigure(n, &demand.req) {
                found = Some((n, trial));
                break;
            }
            nodes.remove(&(rank, n));
        }
        if let Some((n, trial)) = found {
            cap.set_options(n, &trial);
            cap.take(n, &demand.req);
            prefer_node[d] = Some(n);
        }
    }
    Decision {
        option: cap.option,
        prefer_node,
        prefer_group: vec![Vec::new(); p.demands.len()],
    }
}

/// Most GPUs per capacity group that get drain options in one plan.
pub(crate) const DRAIN_CANDIDATES: usize = 32;

/// The drainable GPUs worth a drain option, given a plan without drains (`o`): none when it
/// places every pending pod (a drain only costs then); otherwise, per capacity group where waiting
/// pods may go, among the GPUs whose model has a profile they ask for, those whose pods the rest
/// of the group has room for first, then the cheapest to drain (fewest pods, least busy;
/// `GpuState::drain_cost`): twice the instances they ask for there, at most the eviction budget
/// (each drain evicts a pod at least) and [`DRAIN_CANDIDATES`].
pub(crate) fn drain_candidates(p: &Problem<'_>, o: &Outcome) -> DrainCandidates {
    let mut wanted: HashMap<usize, (u32, BTreeSet<usize>)> = HashMap::new();
    for (d, dm) in p.demands.iter().enumerate() {
        // A request larger than one GPU (a gang) is served by one node: `gang_candidates`.
        if dm.evicted_from.is_some() || o.placed[d].is_some() || dm.size(p) > GPU_SLICES {
            continue;
        }
        for g in &dm.groups {
            let (instances, profiles) = wanted.entry(*g).or_default();
            for (q, n) in &dm.req {
                *instances += u32::from(*n);
                profiles.insert(*q);
            }
        }
    }
    // Room for evicted pods: per group and profile, what the GPUs could offer without a drain,
    // less what the plan takes. A GPU whose pods fit in the room of the others is ranked first:
    // its drain need not strand anyone (see `Demand::must_move`).
    let ceiling = |g: usize, q: usize| p.gpus[g].options.most_free(q, true);
    let mut room: HashMap<(usize, usize), i64> = HashMap::new();
    for (g, gs) in p.gpus.iter().enumerate() {
        if wanted.contains_key(&gs.group) {
            for q in 0..p.profiles.len() {
                *room.entry((gs.group, q)).or_default() += i64::from(ceiling(g, q));
            }
        }
    }
    for (_, taken) in o.placed.iter().flatten() {
        for (g, q, n) in taken {
            *room.entry((p.gpus[*g].group, *q)).or_default() -= i64::from(*n);
        }
    }
    let movable = |g: usize| {
        let gs = &p.gpus[g];
        let mut held: BTreeMap<usize, i64> = BTreeMap::new();
        for i in gs.busy.instances() {
            *held
                .entry(global_profile(&p.profiles, gs.model, i.profile))
                .or_default() += 1;
        }
        held.iter()
            .all(|(q, n)| room.get(&(gs.group, *q)).copied().unwrap_or(0) - i64::from(ceiling(g, *q)) >= *n)
    };
    let budget = p.policy.budgets.max_evictions.map_or(usize::MAX, |b| b as usize);
    let mut by_group: BTreeMap<usize, Vec<(bool, f64, usize)>> = BTreeMap::new();
    for (g, gs) in p.gpus.iter().enumerate() {
        let (Some(cost), Some((_, profiles))) = (gs.drain_cost, wanted.get(&gs.group)) else {
            continue;
        };
        if profiles
            .iter()
            .any(|q| gs.model.profile_by_name(&p.profiles[*q]).is_some())
        {
            by_group.entry(gs.group).or_default().push((!movable(g), cost, g));
        }
    }
    let mut chosen = BTreeSet::new();
    for (group, mut gpus) in by_group {
        gpus.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        let limit = (2 * wanted[&group].0 as usize).min(budget).min(DRAIN_CANDIDATES);
        chosen.extend(gpus.into_iter().take(limit).map(|(_, _, g)| g));
    }
    let (gang_gpus, gang_nodes) = gang_candidates(p, o, &movable);
    chosen.extend(gang_gpus);
    DrainCandidates {
        gpus: chosen,
        gang_nodes,
    }
}

/// Memory slices of one whole GPU (A100, H100, H200): a request for more is a gang.
const GPU_SLICES: u32 = 8;

/// Most distinct requests for several instances on one node that get a node of drain candidates.
const GANG_REQUESTS: usize = 4;

/// A pod that needs several instances on one node (up to 8 × 7g, a whole node) waits for GPUs of
/// one node to empty, which the cheapest GPUs of a group rarely are. Per such request (at most
/// [`GANG_REQUESTS`]), the node that could hold it once its drainable GPUs are drained, draining
/// which strands fewest GPUs' pods and costs least, gives all its drainable GPUs as candidates.
fn gang_candidates(
    p: &Problem<'_>,
    o: &Outcome,
    movable: &dyn Fn(usize) -> bool,
) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let mut requests: BTreeSet<RequestKey<'_>> = BTreeSet::new();
    for (d, dm) in p.demands.iter().enumerate() {
        let instances: u32 = dm.req.iter().map(|(_, n)| u32::from(*n)).sum();
        if dm.evicted_from.is_none() && o.placed[d].is_none() && instances > 1 {
            requests.insert((dm.req.as_slice(), dm.groups.as_slice()));
        }
    }
    // What a GPU could offer of profile `q`: anything its model can hold when drained, else the
    // best of its options.
    if requests.is_empty() {
        return (BTreeSet::new(), BTreeSet::new());
    }
    // (Most of a profile an empty GPU of a model holds, per model and profile, worked out once.)
    let wanted_profiles: BTreeSet<usize> = requests
        .iter()
        .flat_map(|(req, _)| req.iter().map(|(q, _)| *q))
        .collect();
    let mut most: HashMap<(&str, usize), u32> = HashMap::new();
    for gs in &p.gpus {
        for &q in &wanted_profiles {
            most.entry((gs.model.key.as_str(), q)).or_insert_with(|| {
                gs.model.profile_by_name(&p.profiles[q]).map_or(0, |idx| {
                    let n = gs.model.count_vectors().iter().map(|c| c.get(idx)).max();
                    u32::from(n.unwrap_or(0))
                })
            });
        }
    }
    let offer = |g: usize, q: usize| -> u32 {
        let gs = &p.gpus[g];
        if gs.drain_cost.is_none() {
            return u32::from(gs.options.most_free(q, true));
        }
        most.get(&(gs.model.key.as_str(), q)).copied().unwrap_or(0)
    };
    let (mut chosen, mut nodes) = (BTreeSet::new(), BTreeSet::new());
    for (req, groups) in requests.into_iter().take(GANG_REQUESTS) {
        let best = groups
            .iter()
            .flat_map(|g| p.groups[*g].nodes.iter().copied())
            .filter(|n| p.nodes[*n].schedulable)
            .filter_map(|n| {
                let gpus = &p.nodes[n].gpus;
                let drainable: Vec<usize> = gpus
                    .iter()
                    .copied()
                    .filter(|g| p.gpus[*g].drain_cost.is_some())
                    .collect();
                let holds = req
                    .iter()
                    .all(|(q, need)| gpus.iter().map(|g| offer(*g, *q)).sum::<u32>() >= u32::from(*need));
                if drainable.is_empty() || !holds {
                    return None;
                }
                let stranded = drainable.iter().filter(|g| !movable(**g)).count();
                let cost: f64 = drainable.iter().filter_map(|g| p.gpus[*g].drain_cost).sum();
                Some((stranded, cost, n, drainable))
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        if let Some((_, _, n, drainable)) = best {
            chosen.extend(drainable);
            nodes.insert(n);
        }
    }
    (chosen, nodes)
}

/// Place every demand on real free instances under the decision's options, honouring the node
/// budget, then undo changes that no placed demand uses.
pub(crate) fn realise(p: &Problem<'_>, decision: &Decision) -> Outcome {
    let mut option = decision.option.clone();
    // "Change" to the counts a GPU already has is no change (mig-parted would skip it too).
    for (g, o) in option.iter_mut().enumerate() {
        let opt = &p.gpus[g].options[*o];
        if opt.changed && !opt.drain && opt.counts == p.gpus[g].options[0].counts {
            *o = 0;
        }
    }
    let mut budget_reverted = BTreeSet::new();
    // The aggregated model cannot see nodes: keep the first changed nodes up to the budget.
    if let Some(b) = p.policy.budgets.max_nodes_changed {
        let changed: Vec<usize> = (0..p.nodes.len())
            .filter(|n| node_changed(p, &option, *n))
            .collect();
        for n in changed.into_iter().skip(b as usize) {
            for g in &p.nodes[n].gpus {
                option[*g] = 0;
            }
            budget_reverted.insert(n);
        }
    }
    loop {
        let placed = place_all(p, decision, &option);
        // A changed GPU that hosts nothing new is reverted; a drained one also keeps its pods.
        let mut hosts = vec![false; p.gpus.len()];
        for (d, pl) in placed.iter().enumerate() {
            if let Some((_, taken)) = pl
                && p.demands[d]
                    .evicted_from
                    .is_none_or(|g| !taken.iter().all(|(h, _, _)| *h == g))
            {
                for (g, _, _) in taken {
                    hosts[*g] = true;
                }
            }
        }
        // A drain whose pods must move and one of them found no place is not made.
        let stranded = placed.iter().enumerate().filter_map(|(d, pl)| {
            let dm = &p.demands[d];
            let g = dm.evicted_from?;
            (dm.must_move && pl.is_none() && p.gpus[g].options[option[g]].drain).then_some(g)
        });
        let idle_changes: BTreeSet<usize> = (0..p.gpus.len())
            .filter(|g| p.gpus[*g].options[option[*g]].changed && !hosts[*g])
            .chain(stranded)
            .collect();
        if idle_changes.is_empty() {
            return Outcome {
                option,
                placed,
                budget_reverted,
            };
        }
        for g in idle_changes {
            option[g] = 0;
        }
    }
}

fn place_all(p: &Problem<'_>, decision: &Decision, option: &[usize]) -> Vec<Placement> {
    let mut cap = Capacity::new(p, option.to_vec());
    let mut placed = vec![None; p.demands.len()];
    let order: Vec<usize> = p
        .demand_order()
        .into_iter()
        // A pod whose GPU is not drained after all is not evicted and needs no place.
        .filter(|d| {
            p.demands[*d]
                .evicted_from
                .is_none_or(|g| p.gpus[g].options[option[g]].drain)
        })
        .collect();
    // First where the solver meant each demand to go, so that nobody takes capacity reserved for
    // another; then anything left, wherever it fits.
    for preferred_only in [true, false] {
        for &d in &order {
            if placed[d].is_some() {
                continue;
            }
            let req = &p.demands[d].req;
            let preferred = decision
                .prefer_node
                .get(d)
                .copied()
                .flatten()
                .filter(|n| p.nodes[*n].schedulable && cap.missing(*n, req) == 0);
            let groups = decision.prefer_group.get(d).map_or(&[][..], Vec::as_slice);
            let found = preferred.or_else(|| cap.first_fit(groups, req)).or_else(|| {
                (!preferred_only)
                    .then(|| cap.first_fit(&p.demands[d].groups, req))
                    .flatten()
            });
            if let Some(n) = found {
                // An evicted pod may land on the GPU it left when the new layout still has room:
                // that is a restart in place, and the drain then served nothing (see `realise`).
                placed[d] = Some((n, cap.take(n, req)));
            }
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{FleetSpec, fleet};

    /// First-fit as written before the capacity index and the memo of failed nodes: every
    /// eligible node, in order, for every demand. The indexed greedy must decide exactly the same.
    fn reference_greedy(p: &Problem<'_>) -> Decision {
        let mut option = vec![0; p.gpus.len()];
        let mut used = vec![vec![0u16; p.profiles.len()]; p.gpus.len()];
        let avail = |used: &[Vec<u16>], g: usize, o: usize, q: usize| {
            p.gpus[g].options[o].free[q].saturating_sub(used[g][q])
        };
        let missing = |used: &[Vec<u16>], option: &[usize], n: usize, req: &[(usize, u16)]| -> u32 {
            req.iter()
                .map(|(q, need)| {
                    let have: u32 = p.nodes[n]
                        .gpus
                        .iter()
                        .map(|g| u32::from(avail(used, *g, option[*g], *q)))
                        .sum();
                    u32::from(*need).saturating_sub(have)
                })
                .sum()
        };
        let take = |used: &mut Vec<Vec<u16>>, option: &[usize], n: usize, req: &[(usize, u16)]| {
            for (q, need) in req {
                let mut left = *need;
                for g in &p.nodes[n].gpus {
                    let k = left.min(avail(used, *g, option[*g], *q));
                    used[*g][*q] += k;
                    left -= k;
                }
            }
        };
        let mut prefer_node = vec![None; p.demands.len()];
        let budget = p.policy.budgets.max_nodes_changed.map(|b| b as usize);
        for d in p.demand_order() {
            let demand = &p.demands[d];
            if demand.evicted_from.is_some() {
                continue;
            }
            let nodes: Vec<usize> = eligible_nodes(p, d).filter(|n| p.nodes[*n].schedulable).collect();
            if let Some(n) = nodes
                .iter()
                .copied()
                .find(|n| missing(&used, &option, *n, &demand.req) == 0)
            {
                take(&mut used, &option, n, &demand.req);
                prefer_node[d] = Some(n);
                continue;
            }
            let changed_nodes = (0..p.nodes.len())
                .filter(|m| node_changed(p, &option, *m))
                .count();
            for &n in &nodes {
                if budget.is_some_and(|b| !node_changed(p, &option, n) && changed_nodes >= b) {
                    continue;
                }
                let mut trial = option.clone();
                let mut left = missing(&used, &trial, n, &demand.req);
                for g in &p.nodes[n].gpus {
                    if left == 0 {
                        break;
                    }
                    let mut best = (left, trial[*g]);
                    for (o, opt) in p.gpus[*g].options.iter().enumerate() {
                        if opt.drain || (0..p.profiles.len()).any(|q| opt.free[q] < used[*g][q]) {
                            continue;
                        }
                        let saved = trial[*g];
                        trial[*g] = o;
                        let m = missing(&used, &trial, n, &demand.req);
                        trial[*g] = saved;
                        if m < best.0 {
                            best = (m, o);
                        }
                    }
                    trial[*g] = best.1;
                    left = best.0;
                }
                if left == 0 {
                    option = trial;
                    take(&mut used, &option, n, &demand.req);
                    prefer_node[d] = Some(n);
                    break;
                }
            }
        }
        Decision {
            option,
            prefer_node,
            prefer_group: vec![Vec::new(); p.demands.len()],
        }
    }

    #[test]
    fn indexed_greedy_decides_as_plain_first_fit() {
        let catalog = mig_catalog::Catalog::embedded();
        let mut compared = 0;
        for (gpus, pending, seed) in (1..40u64)
            .flat_map(|s| [(48, 200, s), (160, 400, s)])
            .chain([(800, 3000, 1)])
        {
            for budget in [None, Some(3)] {
                for exact_node_limit in [0, 1000] {
                    let mut s = fleet(&FleetSpec {
                        gpus,
                        pending,
                        busy_gpu_share: 0.6,
                        seed,
                    });
                    s.policy.budgets.max_nodes_changed = budget;
                    s.policy.solver.exact_node_limit = exact_node_limit;
                    let p = Problem::build(catalog, &s, &s.policy, &crate::problem::Drains::None);
                    let (fast, plain) = (greedy(&p), reference_greedy(&p));
                    assert_eq!(
                        fast.option, plain.option,
                        "{gpus} GPUs, {pending} pods, budget {budget:?}"
                    );
                    assert_eq!(
                        fast.prefer_node, plain.prefer_node,
                        "{gpus} GPUs, {pending} pods, budget {budget:?}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 79 * 4);
    }
}
