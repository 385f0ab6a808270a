//! Concrete decisions: an option per GPU and a node per demand. The greedy planner builds one from
//! scratch; the ILP's class-level answer is turned into one here; both end in [`realise`], which
//! places every demand on real free instances and cleans up changes that serve nothing.

use std::collections::BTreeSet;

use crate::problem::Problem;

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

/// Free instances per GPU under the current options, minus what is already taken.
struct Capacity<'a, 'c> {
    p: &'a Problem<'c>,
    used: Vec<Vec<u16>>,
}

impl<'a, 'c> Capacity<'a, 'c> {
    fn new(p: &'a Problem<'c>) -> Self {
        Capacity {
            p,
            used: vec![vec![0; p.profiles.len()]; p.gpus.len()],
        }
    }

    fn avail(&self, g: usize, option: usize, q: usize) -> u16 {
        self.p.gpus[g].options[option].free[q].saturating_sub(self.used[g][q])
    }

    /// What the node still lacks for `req` with these options: Σ_q max(0, need - available).
    fn missing(&self, node: usize, option: &[usize], req: &[(usize, u16)]) -> u32 {
        req.iter()
            .map(|(q, need)| {
                let have: u32 = self.p.nodes[node]
                    .gpus
                    .iter()
                    .map(|g| u32::from(self.avail(*g, option[*g], *q)))
                    .sum();
                u32::from(*need).saturating_sub(have)
            })
            .sum()
    }

    /// Take `req` from the node's GPUs in index order (caller checked it fits).
    fn take(&mut self, node: usize, option: &[usize], req: &[(usize, u16)]) -> Taken {
        let mut taken = Vec::new();
        for (q, need) in req {
            let mut left = *need;
            for g in &self.p.nodes[node].gpus {
                let n = left.min(self.avail(*g, option[*g], *q));
                if n > 0 {
                    self.used[*g][*q] += n;
                    taken.push((*g, *q, n));
                    left -= n;
                }
            }
        }
        taken
    }
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
    let mut option = start.option.clone();
    let mut prefer_node = vec![None; p.demands.len()];
    let mut cap = Capacity::new(p);
    for d in p.demand_order() {
        if let Some(n) = start.prefer_node[d]
            && cap.missing(n, &option, &p.demands[d].req) == 0
        {
            cap.take(n, &option, &p.demands[d].req);
            prefer_node[d] = Some(n);
        }
    }
    let max_nodes = p.policy.budgets.max_nodes_changed.map(|b| b as usize);
    // Upper bound of what each node could offer per profile: skip nodes that can never fit.
    let ceiling: Vec<Vec<u16>> = p
        .nodes
        .iter()
        .map(|n| {
            (0..p.profiles.len())
                .map(|q| {
                    n.gpus
                        .iter()
                        .map(|g| p.gpus[*g].options.iter().map(|o| o.free[q]).max().unwrap_or(0))
                        .sum()
                })
                .collect()
        })
        .collect();
    for d in p.demand_order() {
        let demand = &p.demands[d];
        if demand.evicted_from.is_some() || prefer_node[d].is_some() {
            continue;
        }
        let nodes: Vec<usize> = eligible_nodes(p, d)
            .filter(|n| p.nodes[*n].schedulable && demand.req.iter().all(|(q, c)| ceiling[*n][*q] >= *c))
            .collect();
        // Existing free instances first, anywhere; only then reconfigure.
        if let Some(n) = nodes
            .iter()
            .copied()
            .find(|n| cap.missing(*n, &option, &demand.req) == 0)
        {
            cap.take(n, &option, &demand.req);
            prefer_node[d] = Some(n);
            continue;
        }
        let changed_nodes = (0..p.nodes.len())
            .filter(|m| node_changed(p, &option, *m))
            .count();
        for &n in &nodes {
            if max_nodes.is_some_and(|b| !node_changed(p, &option, n) && changed_nodes >= b) {
                continue;
            }
            let mut trial = option.clone();
            let mut missing = cap.missing(n, &trial, &demand.req);
            for g in &p.nodes[n].gpus {
                let gs = &p.gpus[*g];
                let mut best = (missing, trial[*g]);
                for (o, opt) in gs.options.iter().enumerate() {
                    // Keep what this plan already put on the GPU.
                    if opt.drain || (0..p.profiles.len()).any(|q| opt.free[q] < cap.used[*g][q]) {
                        continue;
                    }
                    let saved = trial[*g];
                    trial[*g] = o;
                    let m = cap.missing(n, &trial, &demand.req);
                    trial[*g] = saved;
                    if m < best.0 {
                        best = (m, o);
                    }
                }
                trial[*g] = best.1;
                missing = best.0;
                if missing == 0 {
                    break;
                }
            }
            if missing == 0 {
                option = trial;
                cap.take(n, &option, &demand.req);
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
        let idle_changes: Vec<usize> = (0..p.gpus.len())
            .filter(|g| p.gpus[*g].options[option[*g]].changed && !hosts[*g])
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
    let mut cap = Capacity::new(p);
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
            let mut candidates: Vec<usize> = Vec::new();
            candidates.extend(decision.prefer_node.get(d).copied().flatten());
            for g in decision.prefer_group.get(d).into_iter().flatten() {
                candidates.extend(p.groups[*g].nodes.iter().copied());
            }
            if !preferred_only {
                candidates.extend(eligible_nodes(p, d));
            }
            let mut seen = BTreeSet::new();
            for n in candidates {
                if !seen.insert(n) || !p.nodes[n].schedulable {
                    continue;
                }
                if cap.missing(n, option, &p.demands[d].req) == 0 {
                    // An evicted pod may land on the GPU it left when the new layout still has room:
                    // that is a restart in place, and the drain then served nothing (see `realise`).
                    placed[d] = Some((n, cap.take(n, option, &p.demands[d].req)));
                    break;
                }
            }
        }
    }
    placed
}
