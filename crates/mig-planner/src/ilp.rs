//! The class-level integer program.
//!
//! Variables: `n[c][o]` = GPUs of class `c` taking option `o` (keep, change to a maximal count vector,
//! or drain and change); `z[k][s]` = pending pods of class `k` placed in capacity group `s`; `y[d]` =
//! pod `d` evicted by a drain and placed again; `u[n]` = node `n` changes (per-node model only).
//! In the aggregated (per-node-group) model `z` is continuous: with integer GPU counts the pod side is
//! close to a transportation problem, and integer `z` made HiGHS spend most of its time propagating
//! bounds in its root rounding heuristics (1,000 GPUs: 190 ms → 20 ms for a better plan, see
//! docs/performance.md). The plan is realised on real instances afterwards, so a fractional count
//! only changes which groups a pod tries first. The per-node model keeps `z` integer (faster there).
//! Capacity per group and profile: pods' requests ≤ free instances of kept GPUs + Σ n·free.
//! Objective: Σ w·placed − Σ w·evicted-and-not-placed − Σ option costs − node costs (see `weights`).
//! Priorities are strict tiers, solved lexicographically: with more than one priority in demand,
//! each priority but the lowest is first maximised alone (its pods' placed value), highest first,
//! and what it reached is kept as a floor for the next solves; the last solve maximises the whole
//! objective under every floor. So no coefficient has to outweigh a whole lower tier (HiGHS sees
//! values of at most a few million), and a pod never waits for capacity given to a lower priority.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use good_lp::solvers::highs::highs;
use good_lp::solvers::microlp::microlp;
use good_lp::{
    Expression, ProblemVariables, ResolutionError, Solution, SolutionStatus, SolverModel, Variable,
    WithInitialSolution, WithMipGap, WithTimeLimit, constraint, variable,
};

use crate::assign::Decision;
use crate::problem::Problem;
use crate::snapshot::SolverSettings;
use crate::weights;

/// What a solver run reports.
#[derive(Clone, Debug)]
pub(crate) struct SolveInfo {
    pub status: String,
    pub objective: f64,
    pub variables: usize,
    pub constraints: usize,
    pub millis: f64,
}

/// A MIP solver for the class model.
pub(crate) trait ClassSolver {
    /// Solver name for the plan.
    fn name(&self) -> &'static str;
    /// Solve, warm-started from `warm`.
    fn solve(
        &self,
        p: &Problem<'_>,
        warm: &Decision,
        settings: &SolverSettings,
    ) -> Result<(Decision, SolveInfo), SolveError>;
}

/// Why the ILP gave no answer. The plan then uses greedy and says why (`fallbackReason`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SolveError {
    /// The model has no variables.
    #[error("nothing to decide")]
    NothingToDecide,
    /// The model is infeasible: a bug, as keeping every GPU as it is is always feasible.
    #[error("infeasible (a bug: keeping every GPU is always feasible)")]
    Infeasible,
    /// The solver failed (its words).
    #[error("{0}")]
    Solver(String),
}

/// HiGHS, one thread, time limit and gap from the policy.
pub(crate) struct Highs;

/// An evicted pod's share per group it may go to.
type GroupParts = Vec<(usize, Variable)>;
/// A class of identical pending pods: its members and, per capacity group, its variable.
type PodClass = (Vec<usize>, Vec<(usize, Variable)>);
/// What makes pods identical for the model: request, groups, weight, priority.
type PodKey = (Vec<(usize, u16)>, Vec<usize>, i64, i32);

/// Variables of one GPU class: one per distinct "keep" (members grouped by actual layout, each var
/// bounded by the group's size) and one per shared change option (`options[1..]`).
struct ClassVars {
    keep: Vec<(Vec<usize>, Variable)>,
    change: Vec<Variable>,
}

struct Model {
    vars: ProblemVariables,
    n: Vec<ClassVars>,
    /// pod class → (demands, per group variable)
    pod_classes: Vec<PodClass>,
    y: HashMap<usize, Variable>,
    /// Per evicted pod that may go to several groups: (group, whether it goes there), summing to y.
    y_group: HashMap<usize, GroupParts>,
    u: BTreeMap<usize, Variable>,
    constraints: Vec<good_lp::Constraint>,
    objective: Expression,
    /// Each priority's placed value (pending pods placed, minus its evicted pods not placed again).
    tier_value: BTreeMap<i32, Expression>,
    /// Every variable, in order (to start a solve from the previous one's solution).
    all: Vec<Variable>,
}

fn build(p: &Problem<'_>) -> Model {
    let mut m = Model {
        tier_value: BTreeMap::new(),
        all: Vec::new(),
        vars: ProblemVariables::new(),
        n: Vec::new(),
        pod_classes: Vec::new(),
        y: HashMap::new(),
        y_group: HashMap::new(),
        u: BTreeMap::new(),
        constraints: Vec::new(),
        objective: Expression::from(0.0),
    };
    m.gpu_classes(p);
    m.pod_classes(p);
    m.evicted_pods(p);
    m.capacity(p);
    m.budgets(p);
    m
}

impl Model {
    fn add(&mut self, definition: good_lp::variable::VariableDefinition) -> Variable {
        let v = self.vars.add(definition);
        self.all.push(v);
        v
    }

    /// GPU classes: how many members keep their layout (by actual layout) and how many take each
    /// shared change option; every change costs.
    fn gpu_classes(&mut self, p: &Problem<'_>) {
        for class in &p.classes {
            let size = class.gpus.len() as f64;
            let opts = &p.gpus[class.gpus[0]].options;
            let mut by_actual: BTreeMap<Vec<u16>, Vec<usize>> = BTreeMap::new();
            for g in &class.gpus {
                by_actual
                    .entry(p.gpus[*g].options[0].free.clone())
                    .or_default()
                    .push(*g);
            }
            let keep: Vec<(Vec<usize>, Variable)> = by_actual
                .into_values()
                .map(|members| {
                    let v = self.add(variable().integer().min(0).max(members.len() as f64));
                    (members, v)
                })
                .collect();
            let change: Vec<Variable> = opts
                .changes()
                .iter()
                .map(|_| self.add(variable().integer().min(0).max(size)))
                .collect();
            let all: Expression = keep
                .iter()
                .map(|(_, v)| Expression::from(*v))
                .chain(change.iter().map(|v| Expression::from(*v)))
                .sum();
            self.constraints.push(constraint!(all == size));
            for (v, o) in change.iter().zip(opts.changes()) {
                self.objective -= o.cost * *v;
            }
            self.n.push(ClassVars { keep, change });
        }
    }

    /// How many GPUs of `g`'s class are drained (0 when `g` is in no class).
    fn drain_of(&self, p: &Problem<'_>, g: usize) -> Expression {
        let ci = p.classes.iter().position(|c| c.gpus.contains(&g));
        match ci {
            Some(ci) => p.gpus[g]
                .options
                .changes()
                .iter()
                .zip(&self.n[ci].change)
                .filter(|(o, _)| o.drain)
                .map(|(_, v)| Expression::from(*v))
                .sum(),
            None => Expression::from(0.0),
        }
    }

    /// Pod classes (same request, groups and weight): how many are placed in each group.
    fn pod_classes(&mut self, p: &Problem<'_>) {
        let mut by_key: BTreeMap<PodKey, Vec<usize>> = BTreeMap::new();
        for (d, dm) in p.demands.iter().enumerate() {
            if dm.evicted_from.is_none() && !dm.groups.is_empty() {
                by_key
                    .entry((dm.req.clone(), dm.groups.clone(), dm.weight as i64, dm.tier))
                    .or_default()
                    .push(d);
            }
        }
        for ((_, groups, weight, tier), members) in by_key {
            let size = members.len() as f64;
            let zs: Vec<(usize, Variable)> = groups
                .iter()
                .map(|s| {
                    let z = variable().min(0).max(size);
                    (*s, self.add(if p.exact { z.integer() } else { z }))
                })
                .collect();
            self.constraints.push(constraint!(
                zs.iter().map(|(_, z)| *z).sum::<Expression>() <= size
            ));
            let value = self.tier_value.entry(tier).or_default();
            for (_, z) in &zs {
                self.objective += weight as f64 * *z;
                *value += weight as f64 * *z;
            }
            self.pod_classes.push((members, zs));
        }
    }

    /// Pods a drain would evict: placed again only if their GPU is drained; each eviction costs.
    fn evicted_pods(&mut self, p: &Problem<'_>) {
        for (d, dm) in p.demands.iter().enumerate() {
            if let Some(g) = dm.evicted_from {
                let v = self.add(variable().binary());
                let drained = self.drain_of(p, g);
                self.constraints.push(constraint!(v <= drained.clone()));
                if dm.must_move {
                    self.constraints.push(constraint!(v >= drained.clone()));
                }
                let value = dm.weight * v - dm.weight * drained;
                self.objective += value.clone();
                *self.tier_value.entry(dm.tier).or_default() += value;
                self.y.insert(d, v);
                if dm.groups.len() > 1 {
                    let parts: Vec<(usize, Variable)> = dm
                        .groups
                        .iter()
                        .map(|s| (*s, self.add(variable().binary())))
                        .collect();
                    self.constraints.push(constraint!(
                        parts.iter().map(|(_, x)| *x).sum::<Expression>() == v
                    ));
                    self.y_group.insert(d, parts);
                }
            }
        }
    }

    /// Capacity per group and profile: placed demand (and spare for recent demand) within supply.
    fn capacity(&mut self, p: &Problem<'_>) {
        let wanted: Vec<usize> = {
            let mut w: Vec<usize> = p
                .demands
                .iter()
                .flat_map(|d| d.req.iter().map(|(q, _)| *q))
                .collect();
            w.sort_unstable();
            w.dedup();
            w
        };
        let shaped: Vec<usize> = p.recent_demand.iter().map(|(q, _)| *q).collect();
        let mut spare: BTreeMap<usize, Vec<Variable>> = BTreeMap::new();
        for s in 0..p.groups.len() {
            for &q in wanted.iter().chain(shaped.iter().filter(|q| !wanted.contains(q))) {
                let mut supply = Expression::from(0.0);
                let mut demand = Expression::from(0.0);
                let mut any_demand = false;
                for g in p.gpus.iter().filter(|g| g.group == s && g.options.len() == 1) {
                    supply += f64::from(g.options[0].free[q]);
                }
                for (ci, class) in p.classes.iter().enumerate() {
                    if p.gpus[class.gpus[0]].group == s {
                        for (members, v) in &self.n[ci].keep {
                            supply += f64::from(p.gpus[members[0]].options[0].free[q]) * *v;
                        }
                        for (v, o) in self.n[ci]
                            .change
                            .iter()
                            .zip(p.gpus[class.gpus[0]].options.changes())
                        {
                            supply += f64::from(o.free[q]) * *v;
                        }
                    }
                }
                for (members, zs) in &self.pod_classes {
                    let need = p.demands[members[0]]
                        .req
                        .iter()
                        .find(|(r, _)| *r == q)
                        .map_or(0, |(_, c)| *c);
                    if need > 0
                        && let Some((_, z)) = zs.iter().find(|(g, _)| *g == s)
                    {
                        demand += f64::from(need) * *z;
                        any_demand = true;
                    }
                }
                for (d, v) in &self.y {
                    let dm = &p.demands[*d];
                    let need = dm.req.iter().find(|(r, _)| *r == q).map_or(0, |(_, c)| *c);
                    // In the group it goes to: its only one, or the one its part says.
                    let there = match self.y_group.get(d) {
                        Some(parts) => parts.iter().find(|(g, _)| *g == s).map(|(_, x)| *x),
                        None => dm.groups.contains(&s).then_some(*v),
                    };
                    if need > 0
                        && let Some(x) = there
                    {
                        demand += f64::from(need) * x;
                        any_demand = true;
                    }
                }
                if let Some((_, target)) = p.recent_demand.iter().find(|(r, _)| *r == q) {
                    // Spare instances of a recently demanded profile, counted up to the demand.
                    let v = self.add(variable().min(0).max(f64::from(*target)));
                    self.constraints.push(constraint!(v + demand <= supply));
                    self.objective += weights::SPARE * v;
                    spare.entry(q).or_default().push(v);
                } else if any_demand {
                    self.constraints.push(constraint!(demand <= supply));
                }
            }
        }
        for (q, target) in &p.recent_demand {
            if let Some(vs) = spare.get(q) {
                self.constraints.push(constraint!(
                    vs.iter().copied().sum::<Expression>() <= f64::from(*target)
                ));
            }
        }
    }

    /// Node changes (exact: one binary per node) and the node, eviction and PDB budgets.
    fn budgets(&mut self, p: &Problem<'_>) {
        let n = &self.n;
        let changed_in =
            |ci: usize| -> Expression { n[ci].change.iter().map(|v| Expression::from(*v)).sum() };
        if p.exact {
            for (node, info) in p.nodes.iter().enumerate() {
                let classes: Vec<usize> = (0..p.classes.len())
                    .filter(|ci| p.gpus[p.classes[*ci].gpus[0]].node == node)
                    .collect();
                if classes.is_empty() {
                    continue;
                }
                let changed: Expression = classes.iter().map(|ci| changed_in(*ci)).sum();
                let un = self.vars.add(variable().binary());
                self.all.push(un);
                self.constraints
                    .push(constraint!(changed <= info.gpus.len() as f64 * un));
                self.objective -= weights::CHANGE_NODE * un;
                self.u.insert(node, un);
            }
            if let Some(b) = p.policy.budgets.max_nodes_changed {
                self.constraints.push(constraint!(
                    self.u.values().copied().sum::<Expression>() <= f64::from(b)
                ));
            }
        } else if let Some(b) = p.policy.budgets.max_nodes_changed {
            // Relaxation; `assign::realise` enforces the exact node budget.
            let per_node = p.nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0) as f64;
            let all: Expression = (0..p.classes.len()).map(changed_in).sum();
            self.constraints.push(constraint!(all <= f64::from(b) * per_node));
        }
        let drains: Vec<(usize, Expression)> = (0..p.gpus.len())
            .filter(|g| p.gpus[*g].options.iter().any(|o| o.drain))
            .map(|g| (g, self.drain_of(p, g)))
            .collect();
        if let Some(max) = p.policy.budgets.max_evictions
            && !drains.is_empty()
        {
            let evicted: Expression = drains
                .iter()
                .map(|(g, e)| p.gpus[*g].pods.len() as f64 * e.clone())
                .sum();
            self.constraints.push(constraint!(evicted <= f64::from(max)));
        }
        for (pdb, allowed) in &p.pdb_allowed {
            let covered: Vec<Expression> = drains
                .iter()
                .map(|(g, e)| {
                    let k = p.gpus[*g]
                        .pods
                        .iter()
                        .filter(|pod| p.pod_pdbs.get(*pod).is_some_and(|v| v.contains(pdb)))
                        .count();
                    k as f64 * e.clone()
                })
                .collect();
            if !covered.is_empty() {
                self.constraints.push(constraint!(
                    covered.into_iter().sum::<Expression>() <= f64::from(*allowed)
                ));
            }
        }
    }
}

/// How far below what a priority reached its floor may be: less than any pod's value (the
/// solver's own tolerances must not make the next solve infeasible).
const FLOOR_SLACK: f64 = 0.5;

/// A good_lp back-end: the model with its variables, objective, constraints, starting solution
/// and time limit (seconds) in, a solution out. Called once per priority tier.
fn solve_model<S, F>(
    p: &Problem<'_>,
    warm: &Decision,
    settings: &SolverSettings,
    solve: F,
) -> Result<(Decision, SolveInfo), SolveError>
where
    S: Solution,
    F: Fn(
        ProblemVariables,
        Expression,
        Vec<good_lp::Constraint>,
        Vec<(Variable, f64)>,
        f64,
    ) -> Result<S, ResolutionError>,
{
    let started = Instant::now();
    let m = build(p);
    let variables = m.vars.len();
    if variables == 0 {
        return Err(SolveError::NothingToDecide);
    }
    let limit = settings.time_limit_ms as f64 / 1000.0;
    // What is left of the time limit (at least a little, so that a late tier still gets an answer).
    let left = || (limit - started.elapsed().as_secs_f64()).max(limit.min(0.05));
    let failed = |e: ResolutionError| match e {
        ResolutionError::Infeasible => SolveError::Infeasible,
        other => SolveError::Solver(other.to_string()),
    };
    let mut initial = warm_start(p, &m, warm);
    let mut constraints = m.constraints.clone();
    let mut status = "optimal";
    let tiers = p.tiers();
    for tier in &tiers[..tiers.len().saturating_sub(1)] {
        let Some(value) = m.tier_value.get(tier) else {
            continue;
        };
        let solution = solve(
            m.vars.clone(),
            value.clone(),
            constraints.clone(),
            initial,
            left(),
        )
        .map_err(failed)?;
        status = worse(status, solution.status());
        let reached = solution.eval(value);
        constraints.push(constraint!(value.clone() >= reached - FLOOR_SLACK));
        initial = m.all.iter().map(|v| (*v, solution.value(*v))).collect();
    }
    let solution =
        solve(m.vars, m.objective.clone(), constraints.clone(), initial, left()).map_err(failed)?;
    let info = SolveInfo {
        status: worse(status, solution.status()).to_string(),
        objective: solution.eval(&m.objective),
        variables,
        constraints: constraints.len(),
        millis: started.elapsed().as_secs_f64() * 1000.0,
    };
    Ok((
        decode(p, &m.n, &m.pod_classes, (&m.y, &m.y_group), &solution),
        info,
    ))
}

/// The status of a series of solves: the first that was not optimal says how it ended.
fn worse(so_far: &'static str, next: SolutionStatus) -> &'static str {
    match (so_far, next) {
        ("optimal", SolutionStatus::Optimal) => "optimal",
        ("optimal", SolutionStatus::TimeLimit) => "time-limit",
        ("optimal", SolutionStatus::GapLimit) => "gap-limit",
        (earlier, _) => earlier,
    }
}

/// The greedy decision in class form.
fn warm_start(p: &Problem<'_>, m: &Model, warm: &Decision) -> Vec<(Variable, f64)> {
    let mut initial: Vec<(Variable, f64)> = Vec::new();
    for (ci, class) in p.classes.iter().enumerate() {
        for (members, v) in &m.n[ci].keep {
            initial.push((
                *v,
                members.iter().filter(|g| warm.option[**g] == 0).count() as f64,
            ));
        }
        for (o, v) in m.n[ci].change.iter().enumerate() {
            initial.push((
                *v,
                class.gpus.iter().filter(|g| warm.option[**g] == o + 1).count() as f64,
            ));
        }
    }
    for (members, zs) in &m.pod_classes {
        for (s, z) in zs {
            let k = members
                .iter()
                .filter(|d| warm.prefer_node[**d].is_some_and(|n| p.groups[*s].nodes.contains(&n)))
                .count();
            initial.push((*z, k as f64));
        }
    }
    for v in m.y.values().chain(m.y_group.values().flatten().map(|(_, x)| x)) {
        initial.push((*v, 0.0));
    }
    for (node, v) in &m.u {
        let changed = p.nodes[*node]
            .gpus
            .iter()
            .any(|g| p.gpus[*g].options[warm.option[*g]].changed);
        initial.push((*v, if changed { 1.0 } else { 0.0 }));
    }
    initial
}

/// Back from class counts to a decision per GPU and pod.
fn decode<S: Solution>(
    p: &Problem<'_>,
    n: &[ClassVars],
    pod_classes: &[PodClass],
    (y, y_group): (&HashMap<usize, Variable>, &HashMap<usize, GroupParts>),
    solution: &S,
) -> Decision {
    // Back to GPUs: members keep their layout as the keep variables say; the rest, in order
    // (so that changes gather on the first nodes), take the change options in order.
    let mut option = vec![0usize; p.gpus.len()];
    for (ci, _) in p.classes.iter().enumerate() {
        let mut rest: Vec<usize> = Vec::new();
        for (members, v) in &n[ci].keep {
            let k = solution.value(*v).round().max(0.0) as usize;
            rest.extend(members.iter().skip(k));
        }
        rest.sort_unstable();
        let mut rest = rest.into_iter();
        for (o, v) in n[ci].change.iter().enumerate() {
            let count = solution.value(*v).round().max(0.0) as usize;
            for g in rest.by_ref().take(count) {
                option[g] = o + 1;
            }
        }
    }
    // Pods of a class fill the groups' whole counts in order; in the aggregated model the counts
    // are continuous, and the members left over prefer every group that got a fraction of them.
    let mut prefer_group = vec![Vec::new(); p.demands.len()];
    for (members, zs) in pod_classes {
        let mut members = members.iter();
        let mut fractional = Vec::new();
        for (s, z) in zs {
            let value = solution.value(*z).max(0.0);
            let count = (value + 1e-6).floor();
            if value - count > 1e-6 {
                fractional.push(*s);
            }
            for d in members.by_ref().take(count as usize) {
                prefer_group[*d].push(*s);
            }
        }
        for d in members {
            prefer_group[*d].clone_from(&fractional);
        }
    }
    for (d, v) in y {
        if solution.value(*v) > 0.5 {
            prefer_group[*d] = match y_group.get(d) {
                Some(parts) => parts
                    .iter()
                    .filter(|(_, x)| solution.value(*x) > 0.5)
                    .map(|(g, _)| *g)
                    .collect(),
                None => p.demands[*d].groups.clone(),
            };
        }
    }
    Decision {
        option,
        prefer_node: vec![None; p.demands.len()],
        prefer_group,
    }
}

impl ClassSolver for Highs {
    fn name(&self) -> &'static str {
        "highs"
    }

    fn solve(
        &self,
        p: &Problem<'_>,
        warm: &Decision,
        settings: &SolverSettings,
    ) -> Result<(Decision, SolveInfo), SolveError> {
        solve_model(
            p,
            warm,
            settings,
            |vars, objective, constraints, initial, seconds| {
                let mut model = vars
                    .maximise(objective)
                    .using(highs)
                    .set_time_limit(seconds)
                    .set_threads(1)
                    .set_mip_rel_gap(settings.mip_gap as f32)
                    .map_err(|e| ResolutionError::Str(e.to_string()))?
                    .with_initial_solution(initial);
                model.set_verbose(std::env::var_os("MIG_PLANNER_HIGHS_LOG").is_some());
                constraints
                    .into_iter()
                    .fold(model, |model, c| model.with(c))
                    .solve()
            },
        )
    }
}

/// microlp, good_lp's pure-Rust branch and bound: no C++ toolchain, slower (compared in
/// `benches/plan.rs`).
pub(crate) struct Microlp;

impl ClassSolver for Microlp {
    fn name(&self) -> &'static str {
        "microlp"
    }

    fn solve(
        &self,
        p: &Problem<'_>,
        warm: &Decision,
        settings: &SolverSettings,
    ) -> Result<(Decision, SolveInfo), SolveError> {
        solve_model(
            p,
            warm,
            settings,
            |vars, objective, constraints, initial, seconds| {
                let model = vars
                    .maximise(objective)
                    .using(microlp)
                    .with_time_limit(seconds)
                    .with_mip_gap(settings.mip_gap as f32)
                    .map_err(|e| ResolutionError::Str(e.to_string()))?
                    .with_initial_solution(initial);
                constraints
                    .into_iter()
                    .fold(model, |model, c| model.with(c))
                    .solve()
            },
        )
    }
}
