{{/* Names, labels and the watched namespaces, shared by the templates. */}}

{{- define "pgwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name: the release name when it already says pgwarden. */}}
{{- define "pgwarden.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "pgwarden.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's Deployment, ServiceAccount, ConfigMap, (Cluster)Role(Binding)s. */}}
{{- define "pgwarden.operatorName" -}}
{{- printf "%s-operator" (include "pgwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pgwarden.labels" -}}
{{ include "pgwarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pgwarden
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgwarden.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "pgwarden.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "pgwarden.tag" .) }}
{{- end }}
{{- end }}

{{/* The image of the proxies (PGWARDEN_IMAGE): proxyImage, else the operator's. */}}
{{- define "pgwarden.proxyImage" -}}
{{- if or .Values.proxyImage.repository .Values.proxyImage.tag }}
{{- printf "%s:%s" (.Values.proxyImage.repository | default .Values.image.repository) (.Values.proxyImage.tag | default (include "pgwarden.tag" .)) }}
{{- else }}
{{- include "pgwarden.image" . }}
{{- end }}
{{- end }}

{{/* "true" when the operator watches every namespace (watchNamespaces: ["*"]). */}}
{{- define "pgwarden.clusterWide" -}}
{{- if has "*" .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* The watched namespaces as a JSON list (none given: the release namespace). */}}
{{- define "pgwarden.watchedNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | sortAlpha | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* The subjects of the operator's (Cluster)RoleBindings. */}}
{{- define "pgwarden.operatorSubjects" -}}
- kind: ServiceAccount
  name: {{ include "pgwarden.operatorName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
