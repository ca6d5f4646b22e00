//! The task registry: which tasks taskgate accepts, and whether a call binds
//! to a task's declared parameters the way Python would bind it.
//!
//! Owns the `[registry]` settings, their validation into a [`Registry`], and
//! argument binding ([`Registry::bind`]). The point of binding here rather
//! than in the worker is that a call that can never run (a missing argument,
//! a misspelt keyword) is refused with a 4xx at the HTTP edge instead of being
//! made durable, published and failing later in a worker with a `TypeError`
//! nobody sees.
//!
//! Parameters are declared as Python would write them, one string each:
//!
//! | spelling        | Python            | meaning                                  |
//! |-----------------|-------------------|------------------------------------------|
//! | `"name"`        | `name`            | required, positional or keyword          |
//! | `"name?"`       | `name=...`        | optional (has a default)                 |
//! | `"*args"`       | `*args`           | extra positional arguments               |
//! | `"*"`           | `*`               | later names are keyword-only             |
//! | `"**kwargs"`    | `**kwargs`        | extra keyword arguments                  |
//!
//! Names after `*args` (or a bare `*`) are keyword-only, as in Python. For a
//! Celery task declared with `bind=True`, leave `self` out: callers never
//! pass it.
//!
//! Invariants of a built [`Registry`]:
//! - every signature is one Python itself would compile: identifiers that are
//!   not keywords, no duplicates, no required positional parameter after an
//!   optional one, at most one `*`, `**kwargs` last, a bare `*` followed by a
//!   keyword-only name;
//! - task names are valid [`TaskName`]s and unique;
//! - a registered routing key override is a valid routing key.
//!
//! Binding follows CPython's own order of checks (`initialize_locals` in
//! `ceval.c`): keyword arguments first in the caller's order (unexpected
//! keyword, multiple values), then too many positional arguments, then the
//! first missing required parameter in declaration order. So the error a
//! caller gets is the one Python would have raised for the same call.

use super::routing::validate_routing_key;
use super::TaskName;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// The `[registry]` section as written in the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// When true, tasks that are not listed are refused. When false (the
    /// default), unlisted tasks pass unchecked and listed ones are bound.
    #[serde(default)]
    pub strict: bool,
    #[serde(default)]
    pub tasks: Vec<RegisteredTaskSettings>,
}

/// One `[[registry.tasks]]` entry as written in the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisteredTaskSettings {
    pub name: String,
    /// Python-style parameter spellings, see the module documentation.
    #[serde(default)]
    pub params: Vec<String>,
    /// Routing key used for this task unless the request gives its own.
    #[serde(default)]
    pub routing_key: Option<String>,
}

/// A `[registry]` section that cannot be used. Every variant names the task
/// (and the parameter entry, as written) so the operator can find the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryConfigError {
    #[error("registry.tasks[{index}]: invalid task name {task:?}: {reason}")]
    InvalidTaskName { index: usize, task: String, reason: String },
    #[error("registry.tasks: task {task:?} is listed more than once")]
    DuplicateTask { task: String },
    #[error("registry task {task:?}: invalid parameter {parameter:?}: {reason}")]
    InvalidParameter {
        task: String,
        parameter: String,
        reason: String,
    },
    #[error("registry task {task:?}: duplicate parameter {parameter:?}")]
    DuplicateParameter { task: String, parameter: String },
    #[error(
        "registry task {task:?}: required parameter {parameter:?} follows optional parameter \
         {optional:?} (Python: parameter without a default follows parameter with a default); \
         make it optional or move it before {optional:?}"
    )]
    RequiredAfterOptional {
        task: String,
        parameter: String,
        optional: String,
    },
    #[error(
        "registry task {task:?}: parameter {parameter:?} repeats a star; \
         only one \"*args\" or bare \"*\" is allowed"
    )]
    RepeatedStar { task: String, parameter: String },
    #[error(
        "registry task {task:?}: parameter {parameter:?} follows {var_keyword:?}; \
         \"**kwargs\" must be the last parameter"
    )]
    ParameterAfterVarKeyword {
        task: String,
        parameter: String,
        var_keyword: String,
    },
    #[error(
        "registry task {task:?}: a bare \"*\" must be followed by at least one keyword-only \
         parameter (use \"*args\" to accept extra positional arguments)"
    )]
    BareStarWithoutKeywordOnly { task: String },
    #[error("registry task {task:?}: invalid routing_key {routing_key:?}: {reason}")]
    InvalidRoutingKey {
        task: String,
        routing_key: String,
        reason: String,
    },
}

/// A call that does not bind to the task's declared parameters, or a task
/// the strict registry does not know. Display texts follow Python's
/// `TypeError` wording so they read familiarly to the platform's developers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("unknown task '{task}': the registry is strict and this task is not registered")]
    UnknownTask { task: TaskName },
    #[error(
        "{task}() takes {} but {}",
        describe_positional_capacity(.expected_at_most),
        describe_given(.given)
    )]
    TooManyPositional {
        task: TaskName,
        expected_at_most: usize,
        given: usize,
    },
    /// The first missing required parameter in declaration order.
    #[error("{task}() missing required argument: '{parameter}'")]
    MissingArgument { task: TaskName, parameter: String },
    #[error("{task}() got an unexpected keyword argument '{parameter}'")]
    UnexpectedKeyword { task: TaskName, parameter: String },
    #[error("{task}() got multiple values for argument '{parameter}'")]
    MultipleValues { task: TaskName, parameter: String },
}

fn describe_positional_capacity(expected_at_most: &usize) -> String {
    match *expected_at_most {
        0 => "no positional arguments".to_owned(),
        1 => "at most 1 positional argument".to_owned(),
        n => format!("at most {n} positional arguments"),
    }
}

fn describe_given(given: &usize) -> String {
    match *given {
        1 => "1 was given".to_owned(),
        n => format!("{n} were given"),
    }
}

impl BindError {
    /// The parameter (or keyword) the error is about, for a problem body
    /// that names the field. `None` when the error is about the whole call.
    pub fn parameter(&self) -> Option<&str> {
        match self {
            BindError::UnknownTask { .. } | BindError::TooManyPositional { .. } => None,
            BindError::MissingArgument { parameter, .. }
            | BindError::UnexpectedKeyword { parameter, .. }
            | BindError::MultipleValues { parameter, .. } => Some(parameter),
        }
    }

    /// The task the call was for.
    pub fn task(&self) -> &TaskName {
        match self {
            BindError::UnknownTask { task }
            | BindError::TooManyPositional { task, .. }
            | BindError::MissingArgument { task, .. }
            | BindError::UnexpectedKeyword { task, .. }
            | BindError::MultipleValues { task, .. } => task,
        }
    }
}

/// What the registry contributes to an accepted call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// The registered routing key override, if the task has one.
    pub routing_key: Option<String>,
}

/// The validated registry. Cheap to share behind an `Arc`; read-only.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    strict: bool,
    tasks: HashMap<TaskName, RegisteredTask>,
}

#[derive(Debug, Clone)]
struct RegisteredTask {
    signature: Signature,
    routing_key: Option<String>,
}

/// A Python signature reduced to what binding needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Signature {
    /// Positional-or-keyword parameters, in declaration order.
    positional: Vec<NamedParameter>,
    /// Whether `*args` (under any name) collects extra positional arguments.
    /// A bare `*` does not: it only starts the keyword-only parameters.
    accepts_extra_positional: bool,
    /// Parameters after `*args` or a bare `*`, in declaration order.
    keyword_only: Vec<NamedParameter>,
    /// Whether `**kwargs` (under any name) collects unknown keywords.
    accepts_extra_keywords: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NamedParameter {
    name: String,
    required: bool,
}

impl Registry {
    /// Validates the settings and builds the registry. The first problem
    /// found is returned, naming the task and parameter entry.
    pub fn from_settings(settings: &RegistrySettings) -> Result<Registry, RegistryConfigError> {
        let mut tasks = HashMap::with_capacity(settings.tasks.len());
        for (index, entry) in settings.tasks.iter().enumerate() {
            let name = TaskName::parse(&entry.name).map_err(|reason| RegistryConfigError::InvalidTaskName {
                index,
                task: entry.name.clone(),
                reason,
            })?;
            if tasks.contains_key(&name) {
                return Err(RegistryConfigError::DuplicateTask {
                    task: entry.name.clone(),
                });
            }
            let signature = Signature::parse(&entry.name, &entry.params)?;
            if let Some(routing_key) = &entry.routing_key {
                validate_routing_key(routing_key).map_err(|reason| RegistryConfigError::InvalidRoutingKey {
                    task: entry.name.clone(),
                    routing_key: routing_key.clone(),
                    reason,
                })?;
            }
            tasks.insert(
                name,
                RegisteredTask {
                    signature,
                    routing_key: entry.routing_key.clone(),
                },
            );
        }
        Ok(Registry {
            strict: settings.strict,
            tasks,
        })
    }

    /// Whether unlisted tasks are refused.
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Whether the task is listed in the registry.
    pub fn is_registered(&self, name: &TaskName) -> bool {
        self.tasks.contains_key(name)
    }

    /// An empty, non-strict registry: for taskgate's own built-in tasks
    /// (Celery's chord unlock, the worker probe), which no registry lists.
    pub fn lenient() -> Registry {
        Registry::from_settings(&RegistrySettings::default()).expect("an empty registry is valid")
    }

    /// The routing key the registry gives `name`, if it gives one.
    pub fn routing_key_of(&self, name: &TaskName) -> Option<&str> {
        self.tasks
            .get(name)
            .and_then(|registered| registered.routing_key.as_deref())
    }

    /// Checks that `task(*args, **kwargs)` would bind in Python, and returns
    /// what the registry adds to the call. An unlisted task is refused when
    /// the registry is strict and passes unchecked otherwise.
    pub fn bind(&self, task: &TaskName, args: &[Value], kwargs: &Map<String, Value>) -> Result<Binding, BindError> {
        let Some(registered) = self.tasks.get(task) else {
            return if self.strict {
                Err(BindError::UnknownTask { task: task.clone() })
            } else {
                Ok(Binding::default())
            };
        };
        registered.signature.bind(task, args.len(), kwargs)?;
        Ok(Binding {
            routing_key: registered.routing_key.clone(),
        })
    }
}

/// One parameter entry as spelled in the configuration.
enum ParameterSpelling<'a> {
    Named {
        name: &'a str,
        optional: bool,
    },
    /// `*args`; `None` for a bare `*`.
    Star(Option<&'a str>),
    /// `**kwargs`.
    DoubleStar(&'a str),
}

impl<'a> ParameterSpelling<'a> {
    fn parse(entry: &'a str) -> Result<Self, String> {
        if let Some(name) = entry.strip_prefix("**") {
            check_python_identifier(name)?;
            return Ok(ParameterSpelling::DoubleStar(name));
        }
        if let Some(name) = entry.strip_prefix('*') {
            if name.is_empty() {
                return Ok(ParameterSpelling::Star(None));
            }
            check_python_identifier(name)?;
            return Ok(ParameterSpelling::Star(Some(name)));
        }
        match entry.strip_suffix('?') {
            Some(name) => {
                check_python_identifier(name)?;
                Ok(ParameterSpelling::Named { name, optional: true })
            }
            None => {
                check_python_identifier(entry)?;
                Ok(ParameterSpelling::Named {
                    name: entry,
                    optional: false,
                })
            }
        }
    }
}

/// Words Python reserves; a parameter can never have one of these names.
/// (Soft keywords such as `match`, `case`, `type` and `_` are allowed.)
const PYTHON_KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del",
    "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal",
    "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
];

/// Python's `str.isidentifier()` plus "not a keyword". Non-ASCII names are
/// judged with Unicode alphabetic/alphanumeric, a close approximation of
/// Python's XID_Start/XID_Continue that is exact for ASCII.
fn check_python_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err("a parameter needs a name".to_owned());
    };
    let starts_well = first == '_' || first.is_alphabetic();
    if !starts_well || !chars.all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(format!(
            "{name:?} is not a Python identifier (letters, digits and '_', not starting with a \
             digit; add '?' for optional, prefix '*' or '**' for *args/**kwargs)"
        ));
    }
    if PYTHON_KEYWORDS.contains(&name) {
        return Err(format!("{name:?} is a Python keyword"));
    }
    Ok(())
}

impl Signature {
    /// Compiles parameter entries with the rules Python's compiler applies
    /// to a `def` line, so a registry entry always describes a real function.
    fn parse(task: &str, entries: &[String]) -> Result<Signature, RegistryConfigError> {
        let mut signature = Signature::default();
        let mut names_seen: HashSet<&str> = HashSet::new();
        // The entry that introduced keyword-only parameters (`*args` or `*`).
        let mut star_entry: Option<&str> = None;
        let mut bare_star = false;
        let mut var_keyword_entry: Option<&str> = None;
        let mut first_optional_positional: Option<&str> = None;

        for entry in entries {
            let spelling = ParameterSpelling::parse(entry).map_err(|reason| RegistryConfigError::InvalidParameter {
                task: task.to_owned(),
                parameter: entry.clone(),
                reason,
            })?;
            if let Some(var_keyword) = var_keyword_entry {
                return Err(RegistryConfigError::ParameterAfterVarKeyword {
                    task: task.to_owned(),
                    parameter: entry.clone(),
                    var_keyword: var_keyword.to_owned(),
                });
            }
            let name = match spelling {
                ParameterSpelling::Named { name, .. } => Some(name),
                ParameterSpelling::Star(name) => name,
                ParameterSpelling::DoubleStar(name) => Some(name),
            };
            if let Some(name) = name {
                if !names_seen.insert(name) {
                    return Err(RegistryConfigError::DuplicateParameter {
                        task: task.to_owned(),
                        parameter: entry.clone(),
                    });
                }
            }

            match spelling {
                ParameterSpelling::Named { name, optional } => {
                    let parameter = NamedParameter {
                        name: name.to_owned(),
                        required: !optional,
                    };
                    if star_entry.is_some() {
                        // Keyword-only parameters are matched by name, so
                        // Python lets required and optional ones mix freely.
                        signature.keyword_only.push(parameter);
                        continue;
                    }
                    if optional {
                        first_optional_positional.get_or_insert(entry);
                    } else if let Some(optional_entry) = first_optional_positional {
                        // A positional call could never reach this parameter
                        // without also passing the optional one before it.
                        return Err(RegistryConfigError::RequiredAfterOptional {
                            task: task.to_owned(),
                            parameter: entry.clone(),
                            optional: optional_entry.to_owned(),
                        });
                    }
                    signature.positional.push(parameter);
                }
                ParameterSpelling::Star(name) => {
                    if star_entry.is_some() {
                        return Err(RegistryConfigError::RepeatedStar {
                            task: task.to_owned(),
                            parameter: entry.clone(),
                        });
                    }
                    star_entry = Some(entry);
                    bare_star = name.is_none();
                    signature.accepts_extra_positional = name.is_some();
                }
                ParameterSpelling::DoubleStar(_) => {
                    if bare_star && signature.keyword_only.is_empty() {
                        return Err(RegistryConfigError::BareStarWithoutKeywordOnly { task: task.to_owned() });
                    }
                    var_keyword_entry = Some(entry);
                    signature.accepts_extra_keywords = true;
                }
            }
        }
        if bare_star && signature.keyword_only.is_empty() {
            return Err(RegistryConfigError::BareStarWithoutKeywordOnly { task: task.to_owned() });
        }
        Ok(signature)
    }

    /// Position of a parameter that can be passed by keyword: positional
    /// ones first, then keyword-only ones. `*args`/`**kwargs` names are not
    /// bindable by keyword, exactly as in Python.
    fn keyword_slot(&self, keyword: &str) -> Option<usize> {
        self.positional
            .iter()
            .chain(&self.keyword_only)
            .position(|parameter| parameter.name == keyword)
    }

    /// Binds a call the way CPython does, in CPython's order of checks.
    fn bind(&self, task: &TaskName, positional_given: usize, kwargs: &Map<String, Value>) -> Result<(), BindError> {
        let filled_positionally = positional_given.min(self.positional.len());
        let mut filled_by_keyword = vec![false; self.positional.len() + self.keyword_only.len()];

        // Keywords first, in the caller's order (the map preserves it).
        for keyword in kwargs.keys() {
            match self.keyword_slot(keyword) {
                Some(slot) if slot < filled_positionally => {
                    return Err(BindError::MultipleValues {
                        task: task.clone(),
                        parameter: keyword.clone(),
                    });
                }
                // Map keys are unique, so a slot is filled by keyword at most once.
                Some(slot) => filled_by_keyword[slot] = true,
                None if self.accepts_extra_keywords => {}
                None => {
                    return Err(BindError::UnexpectedKeyword {
                        task: task.clone(),
                        parameter: keyword.clone(),
                    });
                }
            }
        }

        if positional_given > self.positional.len() && !self.accepts_extra_positional {
            return Err(BindError::TooManyPositional {
                task: task.clone(),
                expected_at_most: self.positional.len(),
                given: positional_given,
            });
        }

        let first_missing = self
            .positional
            .iter()
            .chain(&self.keyword_only)
            .enumerate()
            .find(|(slot, parameter)| parameter.required && *slot >= filled_positionally && !filled_by_keyword[*slot]);
        if let Some((_, parameter)) = first_missing {
            return Err(BindError::MissingArgument {
                task: task.clone(),
                parameter: parameter.name.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task_name(name: &str) -> TaskName {
        TaskName::parse(name).expect("valid task name in test")
    }

    fn entry(name: &str, params: &[&str]) -> RegisteredTaskSettings {
        RegisteredTaskSettings {
            name: name.to_owned(),
            params: params.iter().map(|p| (*p).to_owned()).collect(),
            routing_key: None,
        }
    }

    fn registry_with(strict: bool, tasks: Vec<RegisteredTaskSettings>) -> Registry {
        Registry::from_settings(&RegistrySettings { strict, tasks }).expect("valid registry")
    }

    fn config_error(params: &[&str]) -> RegistryConfigError {
        Registry::from_settings(&RegistrySettings {
            strict: true,
            tasks: vec![entry("t.task", params)],
        })
        .expect_err("signature should be rejected")
    }

    fn kwargs(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("kwargs must be an object, got {other}"),
        }
    }

    /// Binds a call to a task registered with `params` in a strict registry.
    fn bind(params: &[&str], args: Value, kw: Value) -> Result<Binding, BindError> {
        let registry = registry_with(true, vec![entry("t.task", params)]);
        let args = match args {
            Value::Array(items) => items,
            other => panic!("args must be an array, got {other}"),
        };
        registry.bind(&task_name("t.task"), &args, &kwargs(kw))
    }

    const EXPORT: &[&str] = &["org_slug", "project_slug", "output_type?"];

    // ---- settings ----

    #[test]
    fn settings_default_to_an_empty_lenient_registry() {
        let settings: RegistrySettings = serde_json::from_value(json!({})).unwrap();
        assert_eq!(settings, RegistrySettings::default());
        let registry = Registry::from_settings(&settings).unwrap();
        assert!(!registry.is_strict());
    }

    #[test]
    fn settings_from_the_design_example_parse() {
        let toml = r#"
            strict = true

            [[tasks]]
            name = "export.project"
            params = ["org_slug", "project_slug", "output_type?"]
        "#;
        let settings: RegistrySettings =
            figment::Figment::from(<figment::providers::Toml as figment::providers::Format>::string(toml))
                .extract()
                .unwrap();
        assert!(settings.strict);
        assert_eq!(settings.tasks, vec![entry("export.project", EXPORT)]);
        let registry = Registry::from_settings(&settings).unwrap();
        assert!(registry.is_registered(&task_name("export.project")));
    }

    #[test]
    fn settings_reject_unknown_keys() {
        assert!(serde_json::from_value::<RegistrySettings>(json!({"strcit": true})).is_err());
        assert!(serde_json::from_value::<RegisteredTaskSettings>(json!({"name": "a", "parameters": []})).is_err());
    }

    #[test]
    fn settings_keep_a_routing_key_override() {
        let settings: RegisteredTaskSettings =
            serde_json::from_value(json!({"name": "a.b", "routing_key": "reports"})).unwrap();
        assert_eq!(settings.routing_key.as_deref(), Some("reports"));
        assert!(settings.params.is_empty());
    }

    // ---- configuration validation ----

    #[test]
    fn invalid_task_names_are_rejected_with_their_index() {
        let error = Registry::from_settings(&RegistrySettings {
            strict: false,
            tasks: vec![entry("ok", &[]), entry("has space", &[])],
        })
        .unwrap_err();
        assert!(matches!(
            &error,
            RegistryConfigError::InvalidTaskName { index: 1, task, .. } if task == "has space"
        ));
        assert!(error.to_string().contains("registry.tasks[1]"));

        let empty = Registry::from_settings(&RegistrySettings {
            strict: false,
            tasks: vec![entry("", &[])],
        });
        assert!(matches!(
            empty,
            Err(RegistryConfigError::InvalidTaskName { index: 0, .. })
        ));
    }

    #[test]
    fn duplicate_task_names_are_rejected() {
        let error = Registry::from_settings(&RegistrySettings {
            strict: false,
            tasks: vec![entry("a.b", &["x"]), entry("a.b", &["y"])],
        })
        .unwrap_err();
        assert_eq!(error, RegistryConfigError::DuplicateTask { task: "a.b".to_owned() });
    }

    #[test]
    fn parameter_names_must_be_python_identifiers() {
        for bad in [
            "",
            "?",
            "1st",
            "org-slug",
            "org slug",
            "a.b",
            "x??",
            "*",
            "**",
            "*?",
            "*args?",
            "**kwargs?",
            "***x",
            "?x",
            "é?x",
        ] {
            // A lone "*" is legal syntax but needs a keyword-only name after
            // it; test it separately below.
            if bad == "*" {
                continue;
            }
            let error = config_error(&[bad]);
            assert!(
                matches!(&error, RegistryConfigError::InvalidParameter { parameter, .. } if parameter == bad),
                "{bad:?} gave {error:?}"
            );
        }
    }

    #[test]
    fn python_keywords_are_not_parameter_names() {
        for keyword in ["class", "None", "lambda", "async", "from"] {
            let error = config_error(&[keyword]);
            assert!(
                matches!(&error, RegistryConfigError::InvalidParameter { reason, .. } if reason.contains("keyword")),
                "{keyword} gave {error:?}"
            );
        }
        // Soft keywords and unicode identifiers are fine, as in Python 3.
        registry_with(true, vec![entry("t", &["match", "type", "_", "größe", "x1"])]);
    }

    #[test]
    fn duplicate_parameters_are_rejected_across_all_kinds() {
        for params in [
            &["a", "a"][..],
            &["a", "a?"],
            &["a", "*a"],
            &["a", "**a"],
            &["*args", "args"],
            &["*args", "**args"],
        ] {
            assert!(
                matches!(config_error(params), RegistryConfigError::DuplicateParameter { .. }),
                "{params:?}"
            );
        }
    }

    #[test]
    fn required_parameter_after_optional_is_rejected_naming_both() {
        let error = config_error(&["org_slug", "output_type?", "project_slug"]);
        assert_eq!(
            error,
            RegistryConfigError::RequiredAfterOptional {
                task: "t.task".to_owned(),
                parameter: "project_slug".to_owned(),
                optional: "output_type?".to_owned(),
            }
        );
        let message = error.to_string();
        assert!(message.contains("t.task") && message.contains("project_slug"));
    }

    #[test]
    fn keyword_only_parameters_may_mix_required_and_optional() {
        // def f(a, b=None, *args, c=None, d, **kwargs) is valid Python.
        registry_with(true, vec![entry("t", &["a", "b?", "*args", "c?", "d", "**kwargs"])]);
        registry_with(true, vec![entry("t", &["a?", "*", "b"])]);
    }

    #[test]
    fn only_one_star_is_allowed() {
        for params in [&["*args", "*more"][..], &["*", "a", "*args"], &["*args", "*"]] {
            assert!(
                matches!(config_error(params), RegistryConfigError::RepeatedStar { .. }),
                "{params:?}"
            );
        }
    }

    #[test]
    fn var_keyword_must_be_last() {
        assert_eq!(
            config_error(&["**kwargs", "a"]),
            RegistryConfigError::ParameterAfterVarKeyword {
                task: "t.task".to_owned(),
                parameter: "a".to_owned(),
                var_keyword: "**kwargs".to_owned(),
            }
        );
        assert!(matches!(
            config_error(&["**kwargs", "*args"]),
            RegistryConfigError::ParameterAfterVarKeyword { .. }
        ));
        assert!(matches!(
            config_error(&["**kwargs", "**more"]),
            RegistryConfigError::ParameterAfterVarKeyword { .. }
        ));
    }

    #[test]
    fn bare_star_needs_a_keyword_only_parameter() {
        for params in [&["*"][..], &["a", "*"], &["*", "**kwargs"]] {
            assert!(
                matches!(
                    config_error(params),
                    RegistryConfigError::BareStarWithoutKeywordOnly { .. }
                ),
                "{params:?}"
            );
        }
    }

    #[test]
    fn registered_routing_key_must_be_valid() {
        let mut task = entry("a.b", &[]);
        task.routing_key = Some("reports.*".to_owned());
        let error = Registry::from_settings(&RegistrySettings {
            strict: true,
            tasks: vec![task],
        })
        .unwrap_err();
        assert!(matches!(error, RegistryConfigError::InvalidRoutingKey { .. }));
    }

    // ---- registry lookups ----

    #[test]
    fn unknown_task_is_refused_only_when_strict() {
        let strict = registry_with(true, vec![entry("export.project", EXPORT)]);
        let unknown = task_name("export.other");
        assert!(strict.is_strict());
        assert!(!strict.is_registered(&unknown));
        let error = strict.bind(&unknown, &[], &Map::new()).unwrap_err();
        assert_eq!(error, BindError::UnknownTask { task: unknown.clone() });
        assert_eq!(error.parameter(), None);
        assert!(error.to_string().contains("export.other"));

        let lenient = registry_with(false, vec![entry("export.project", EXPORT)]);
        // Anything goes for an unlisted task; nothing is checked.
        let binding = lenient
            .bind(
                &unknown,
                &[json!(1), json!(2), json!(3), json!(4)],
                &kwargs(json!({"z": 1})),
            )
            .unwrap();
        assert_eq!(binding, Binding { routing_key: None });
    }

    #[test]
    fn listed_tasks_are_checked_even_when_not_strict() {
        let lenient = registry_with(false, vec![entry("export.project", EXPORT)]);
        let error = lenient
            .bind(&task_name("export.project"), &[json!("org")], &Map::new())
            .unwrap_err();
        assert_eq!(error.parameter(), Some("project_slug"));
    }

    #[test]
    fn binding_returns_the_registered_routing_key() {
        let mut routed = entry("report.build", &["*args", "**kwargs"]);
        routed.routing_key = Some("reports".to_owned());
        let registry = registry_with(true, vec![routed, entry("plain", &[])]);
        let binding = registry.bind(&task_name("report.build"), &[], &Map::new()).unwrap();
        assert_eq!(binding.routing_key.as_deref(), Some("reports"));
        let plain = registry.bind(&task_name("plain"), &[], &Map::new()).unwrap();
        assert_eq!(plain.routing_key, None);
    }

    #[test]
    fn default_registry_accepts_everything() {
        let registry = Registry::default();
        assert!(!registry.is_strict());
        assert!(registry.bind(&task_name("x"), &[json!(1)], &Map::new()).is_ok());
    }

    // ---- binding: plain and optional parameters ----

    #[test]
    fn design_example_binds() {
        assert!(bind(EXPORT, json!(["org", "proj"]), json!({"output_type": "xls"})).is_ok());
        assert!(bind(EXPORT, json!(["org", "proj", "xls"]), json!({})).is_ok());
        assert!(bind(EXPORT, json!(["org", "proj"]), json!({})).is_ok());
        assert!(bind(EXPORT, json!([]), json!({"project_slug": "p", "org_slug": "o"})).is_ok());
        assert!(bind(EXPORT, json!(["org"]), json!({"project_slug": "p"})).is_ok());
    }

    #[test]
    fn missing_required_argument_names_the_first_in_declaration_order() {
        let error = bind(EXPORT, json!([]), json!({"output_type": "xls"})).unwrap_err();
        assert_eq!(
            error,
            BindError::MissingArgument {
                task: task_name("t.task"),
                parameter: "org_slug".to_owned()
            }
        );
        assert_eq!(error.parameter(), Some("org_slug"));

        let error = bind(EXPORT, json!(["org"]), json!({})).unwrap_err();
        assert_eq!(error.parameter(), Some("project_slug"));
        assert_eq!(error.to_string(), "t.task() missing required argument: 'project_slug'");

        // Given by keyword only for the first: the second is still missing.
        let error = bind(EXPORT, json!([]), json!({"org_slug": "o"})).unwrap_err();
        assert_eq!(error.parameter(), Some("project_slug"));
    }

    #[test]
    fn too_many_positional_arguments() {
        let error = bind(EXPORT, json!([1, 2, 3, 4]), json!({})).unwrap_err();
        assert_eq!(
            error,
            BindError::TooManyPositional {
                task: task_name("t.task"),
                expected_at_most: 3,
                given: 4
            }
        );
        assert_eq!(error.parameter(), None);
        assert_eq!(
            error.to_string(),
            "t.task() takes at most 3 positional arguments but 4 were given"
        );

        let error = bind(&[], json!([1]), json!({})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "t.task() takes no positional arguments but 1 was given"
        );
        let error = bind(&["a"], json!([1, 2]), json!({})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "t.task() takes at most 1 positional argument but 2 were given"
        );
    }

    #[test]
    fn unexpected_keyword_argument() {
        let error = bind(EXPORT, json!(["o", "p"]), json!({"outputtype": "xls"})).unwrap_err();
        assert_eq!(
            error,
            BindError::UnexpectedKeyword {
                task: task_name("t.task"),
                parameter: "outputtype".to_owned()
            }
        );
        assert_eq!(
            error.to_string(),
            "t.task() got an unexpected keyword argument 'outputtype'"
        );
        // Keys that are not identifiers are just unexpected.
        let error = bind(EXPORT, json!(["o", "p"]), json!({"output-type": 1})).unwrap_err();
        assert_eq!(error.parameter(), Some("output-type"));
    }

    #[test]
    fn multiple_values_for_an_argument() {
        let error = bind(EXPORT, json!(["o", "p"]), json!({"org_slug": "again"})).unwrap_err();
        assert_eq!(
            error,
            BindError::MultipleValues {
                task: task_name("t.task"),
                parameter: "org_slug".to_owned()
            }
        );
        assert_eq!(
            error.to_string(),
            "t.task() got multiple values for argument 'org_slug'"
        );
        // An optional one given both ways, too.
        let error = bind(EXPORT, json!(["o", "p", "x"]), json!({"output_type": "y"})).unwrap_err();
        assert_eq!(error.parameter(), Some("output_type"));
    }

    #[test]
    fn errors_come_in_cpythons_order() {
        // def f(a, b=None): f(1, 2, 3, a=1, zz=2) -> multiple values for 'a'
        // (keywords are checked before the positional count).
        let error = bind(&["a", "b?"], json!([1, 2, 3]), json!({"a": 1, "zz": 2})).unwrap_err();
        assert!(matches!(error, BindError::MultipleValues { ref parameter, .. } if parameter == "a"));
        // Keyword errors are reported in the caller's order.
        let error = bind(&["a", "b?"], json!([1]), json!({"zz": 2, "a": 1})).unwrap_err();
        assert!(matches!(error, BindError::UnexpectedKeyword { ref parameter, .. } if parameter == "zz"));
        // Too many positional beats missing keyword-only.
        let error = bind(&["a", "*", "k"], json!([1, 2]), json!({})).unwrap_err();
        assert!(matches!(
            error,
            BindError::TooManyPositional {
                expected_at_most: 1,
                given: 2,
                ..
            }
        ));
        // Unexpected keyword beats missing positional.
        let error = bind(&["a"], json!([]), json!({"b": 1})).unwrap_err();
        assert!(matches!(error, BindError::UnexpectedKeyword { .. }));
    }

    #[test]
    fn no_parameters_means_no_arguments() {
        assert!(bind(&[], json!([]), json!({})).is_ok());
        assert!(matches!(
            bind(&[], json!([]), json!({"x": 1})),
            Err(BindError::UnexpectedKeyword { .. })
        ));
    }

    #[test]
    fn all_optional_parameters() {
        let params = &["a?", "b?"];
        assert!(bind(params, json!([]), json!({})).is_ok());
        assert!(bind(params, json!([]), json!({"b": 1})).is_ok());
        assert!(bind(params, json!([1, 2]), json!({})).is_ok());
        assert!(matches!(
            bind(params, json!([1, 2, 3]), json!({})),
            Err(BindError::TooManyPositional {
                expected_at_most: 2,
                given: 3,
                ..
            })
        ));
    }

    // ---- binding: *args, keyword-only, **kwargs ----

    #[test]
    fn var_positional_absorbs_extra_positional_arguments() {
        let params = &["a", "*args"];
        assert!(bind(params, json!([1]), json!({})).is_ok());
        assert!(bind(params, json!([1, 2, 3, 4, 5]), json!({})).is_ok());
        assert!(matches!(
            bind(params, json!([]), json!({})),
            Err(BindError::MissingArgument { ref parameter, .. }) if parameter == "a"
        ));
        // `*args` cannot be passed by keyword.
        assert!(matches!(
            bind(params, json!([1]), json!({"args": [2]})),
            Err(BindError::UnexpectedKeyword { ref parameter, .. }) if parameter == "args"
        ));
        // Still a real parameter for the positional ones it does not absorb.
        assert!(matches!(
            bind(params, json!([1, 2]), json!({"a": 1})),
            Err(BindError::MultipleValues { .. })
        ));
    }

    #[test]
    fn var_keyword_absorbs_unknown_keywords() {
        let params = &["a", "**kwargs"];
        assert!(bind(params, json!([1]), json!({"anything": 1, "output-type": 2})).is_ok());
        assert!(bind(params, json!([]), json!({"a": 1, "kwargs": 2})).is_ok());
        // Named parameters still bind strictly.
        assert!(matches!(
            bind(params, json!([1]), json!({"a": 2})),
            Err(BindError::MultipleValues { .. })
        ));
        assert!(matches!(
            bind(params, json!([1, 2]), json!({})),
            Err(BindError::TooManyPositional {
                expected_at_most: 1,
                given: 2,
                ..
            })
        ));
        assert!(matches!(
            bind(params, json!([]), json!({"b": 1})),
            Err(BindError::MissingArgument { ref parameter, .. }) if parameter == "a"
        ));
    }

    #[test]
    fn args_and_kwargs_accept_any_call() {
        let params = &["*args", "**kwargs"];
        assert!(bind(params, json!([]), json!({})).is_ok());
        assert!(bind(params, json!([1, 2, 3]), json!({"args": 1, "kwargs": 2, "x": 3})).is_ok());
    }

    #[test]
    fn keyword_only_parameters_bind_by_keyword_only() {
        // def f(a, *args, key, flag=False)
        let params = &["a", "*args", "key", "flag?"];
        assert!(bind(params, json!([1, 2, 3]), json!({"key": 1})).is_ok());
        assert!(bind(params, json!([1]), json!({"key": 1, "flag": true})).is_ok());
        let error = bind(params, json!([1, 2]), json!({})).unwrap_err();
        assert_eq!(error.parameter(), Some("key"));
        assert!(matches!(error, BindError::MissingArgument { .. }));
        assert!(matches!(
            bind(params, json!([1]), json!({"key": 1, "other": 2})),
            Err(BindError::UnexpectedKeyword { .. })
        ));
    }

    #[test]
    fn bare_star_makes_later_parameters_keyword_only() {
        // def f(a, *, key): extra positionals are refused.
        let params = &["a", "*", "key"];
        assert!(bind(params, json!([1]), json!({"key": 2})).is_ok());
        assert!(matches!(
            bind(params, json!([1, 2]), json!({"key": 2})),
            Err(BindError::TooManyPositional {
                expected_at_most: 1,
                given: 2,
                ..
            })
        ));
        assert!(matches!(
            bind(params, json!([1]), json!({})),
            Err(BindError::MissingArgument { ref parameter, .. }) if parameter == "key"
        ));
    }

    #[test]
    fn missing_positional_reported_before_missing_keyword_only() {
        let params = &["a", "*", "key"];
        let error = bind(params, json!([]), json!({})).unwrap_err();
        assert_eq!(error.parameter(), Some("a"));
    }

    #[test]
    fn bind_error_reports_its_task() {
        let error = bind(EXPORT, json!([]), json!({})).unwrap_err();
        assert_eq!(error.task(), &task_name("t.task"));
    }
}
