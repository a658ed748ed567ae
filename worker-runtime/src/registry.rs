//! The work types a worker can run, by name. A job's `type` selects one; nothing else in a job
//! can choose code.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::Work;

#[derive(Clone, Default)]
pub struct Registry {
    works: BTreeMap<String, Arc<dyn Work>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.works.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in work types (`demo.*`, `chromium.*`).
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::demo::register(&mut r);
        crate::chromium::works::register(&mut r);
        r
    }

    /// Registers `work` as `name`, replacing any earlier one of that name.
    ///
    /// # Panics
    /// If `name` is not a valid work type name: that is a programming error, found at start.
    pub fn register(&mut self, name: &str, work: impl Work) -> &mut Self {
        if let Err(e) = rota_common::names::check_name("work type", name) {
            panic!("{e}");
        }
        self.works.insert(name.to_owned(), Arc::new(work));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Work>> {
        self.works.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.works.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.works.keys().map(String::as_str)
    }
}
