//! A small XML element tree over quick-xml's events: enough to read a libvirt domain and to edit
//! it without losing what it does not touch (text, whitespace, comments stay as they were).
//! Names are kept as written, prefix included: libvirt writes its namespaces with fixed prefixes.

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct XmlError(pub String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    /// Text as escaped in the document.
    Text(String),
    /// A comment, processing instruction, CDATA section or doctype, written back unchanged.
    Other(Event<'static>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    /// Attribute names and unescaped values, in document order.
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn new(name: &str, attrs: &[(&str, &str)]) -> Self {
        Self {
            name: name.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            children: Vec::new(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.into(),
            None => self.attrs.push((name.into(), value.into())),
        }
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.name == name)
    }

    /// The element's text content, unescaped and trimmed.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for node in &self.children {
            if let Node::Text(t) = node {
                text.push_str(&quick_xml::escape::unescape(t).unwrap_or_else(|_| t.into()));
            }
        }
        text.trim().to_owned()
    }

    /// Appends `child` as the last element, indented as a child at `depth` (the child's own
    /// depth, 2 spaces each) the way libvirt formats its XML.
    pub fn append(&mut self, child: Element, depth: usize) -> &mut Element {
        let indent = |d: usize| format!("\n{}", "  ".repeat(d));
        // Keep the closing tag's indentation after the new child.
        let closing = match self.children.last() {
            Some(Node::Text(t)) if t.trim().is_empty() => self.children.pop(),
            _ => None,
        };
        self.children.push(Node::Text(indent(depth)));
        self.children.push(Node::Element(child));
        self.children
            .push(closing.unwrap_or_else(|| Node::Text(indent(depth - 1))));
        let at = self.children.len() - 2;
        match &mut self.children[at] {
            Node::Element(e) => e,
            _ => unreachable!("just pushed"),
        }
    }

    /// Removes the element children for which `drop` holds, with the whitespace before each.
    pub fn remove_elements(&mut self, mut drop: impl FnMut(&Element) -> bool) {
        let mut kept: Vec<Node> = Vec::with_capacity(self.children.len());
        for node in std::mem::take(&mut self.children) {
            if matches!(&node, Node::Element(e) if drop(e)) {
                if matches!(kept.last(), Some(Node::Text(t)) if t.trim().is_empty()) {
                    kept.pop();
                }
                continue;
            }
            kept.push(node);
        }
        self.children = kept;
    }
}

/// A parsed document: what precedes the root (declaration, comments), the root, what follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub prolog: Vec<Node>,
    pub root: Element,
    pub epilog: Vec<Node>,
}

fn start_element(start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let name = start.name().as_ref().to_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError(format!("<{name}>: {e}")))?;
        let key = attr.key.as_ref().to_owned();
        let value = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| XmlError(format!("<{name} {key}>: {e}")))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
    })
}

impl Document {
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let (mut prolog, mut epilog, mut root) = (Vec::new(), Vec::new(), None);
        loop {
            let event = reader
                .read_event()
                .map_err(|e| XmlError(format!("at byte {}: {e}", reader.buffer_position())))?;
            let node = match event {
                Event::Eof => break,
                Event::Start(start) => {
                    stack.push(start_element(&start)?);
                    continue;
                }
                Event::End(end) => {
                    let element = stack
                        .pop()
                        .ok_or_else(|| XmlError("unbalanced end".into()))?;
                    if element.name != end.name().as_ref() {
                        return Err(XmlError(format!(
                            "</{}> closes <{}>",
                            end.name().as_ref(),
                            element.name
                        )));
                    }
                    Node::Element(element)
                }
                Event::Empty(start) => Node::Element(start_element(&start)?),
                Event::Text(text) => Node::Text((*text).to_owned()),
                Event::GeneralRef(r) => Node::Text(format!("&{};", &*r)),
                other => Node::Other(other.into_owned()),
            };
            match (stack.last_mut(), node) {
                (Some(parent), node) => parent.children.push(node),
                (None, Node::Element(element)) if root.is_none() => root = Some(element),
                (None, Node::Element(_)) => {
                    return Err(XmlError("more than one root element".into()))
                }
                (None, node) if root.is_none() => prolog.push(node),
                (None, node) => epilog.push(node),
            }
        }
        if !stack.is_empty() {
            return Err(XmlError(format!(
                "<{}> is not closed",
                stack[stack.len() - 1].name
            )));
        }
        let root = root.ok_or_else(|| XmlError("no root element".into()))?;
        Ok(Self {
            prolog,
            root,
            epilog,
        })
    }

    pub fn to_xml(&self) -> String {
        let mut writer = Writer::new(Vec::new());
        for node in self
            .prolog
            .iter()
            .chain([Node::Element(self.root.clone())].iter())
            .chain(&self.epilog)
        {
            write_node(&mut writer, node);
        }
        String::from_utf8(writer.into_inner()).expect("written from strings")
    }
}

fn write_node(writer: &mut Writer<Vec<u8>>, node: &Node) {
    // Writing to a Vec cannot fail.
    let write = |writer: &mut Writer<Vec<u8>>, event: Event<'_>| {
        writer.write_event(event).expect("writing to memory");
    };
    match node {
        Node::Text(text) => write(writer, Event::Text(BytesText::from_escaped(text.as_str()))),
        Node::Other(event) => write(writer, event.borrow()),
        Node::Element(element) => {
            let mut start = BytesStart::new(element.name.as_str());
            for (key, value) in &element.attrs {
                start.push_attribute((key.as_str(), value.as_str()));
            }
            if element.children.is_empty() {
                write(writer, Event::Empty(start));
            } else {
                write(writer, Event::Start(start));
                for child in &element.children {
                    write_node(writer, child);
                }
                write(writer, Event::End(BytesEnd::new(element.name.as_str())));
            }
        }
    }
}
