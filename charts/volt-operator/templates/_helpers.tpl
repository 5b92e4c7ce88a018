{{/*
The chart name, or nameOverride.
*/}}
{{- define "volt-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the objects: fullnameOverride, else the release name, followed by the chart
name unless the release name contains it. Cut at 55 characters, so that the metrics Service
(`<fullname>-metrics`) is still a valid 63-character DNS label.
*/}}
{{- define "volt-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "volt-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "volt-operator.labels" -}}
helm.sh/chart: {{ include "volt-operator.chart" . }}
{{ include "volt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: volt-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pods.
*/}}
{{- define "volt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "volt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "volt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "volt-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image: repository@digest, else repository:tag (the tag defaults to the appVersion).
*/}}
{{- define "volt-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The leader-election Lease: its name and namespace.
*/}}
{{- define "volt-operator.leaseName" -}}
{{- default (include "volt-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "volt-operator.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/*
A number as the operator parses it: whole numbers without an exponent (Helm reads numbers in
values as floats, and 67108864 would print as 6.7108864e+07), others as they are.
*/}}
{{- define "volt-operator.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The subjects bound to the operator's roles: its ServiceAccount and rbac.extraSubjects.
*/}}
{{- define "volt-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "volt-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- with .Values.rbac.extraSubjects }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
What the operator does in the namespaces it watches (see docs/security.md).
*/}}
{{- define "volt-operator.rules" -}}
# Agents, Workflows, WorkflowRuns and Budgets: watched, and their status written with
# server-side apply.
- apiGroups: ["volt.dev"]
  resources: ["agents", "workflows", "workflowruns", "budgets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["volt.dev"]
  resources: ["agents/status", "workflows/status", "workflowruns/status", "budgets/status"]
  verbs: ["patch"]
# WorkflowSchedules: watched, and their status written with server-side apply; the runs they
# start are created, cancelled (Replace) and deleted (history limits) with the rights below.
- apiGroups: ["volt.dev"]
  resources: ["workflowschedules"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["volt.dev"]
  resources: ["workflowschedules/status"]
  verbs: ["patch"]
# Finished runs are labelled volt.dev/finished (the operator then tracks them by metadata
# only) and deleted after their spec.ttlSecondsAfterFinished; workflow steps create child
# runs, and cancel or suspend them with their parent; a Budget with onExceeded: Suspend sets a
# run's spec.suspend.
- apiGroups: ["volt.dev"]
  resources: ["workflowruns"]
  verbs: ["create", "patch", "delete"]
# The pods of a run and the Deployment of an Agent carry an owner reference that blocks the
# owner's deletion; clusters with the OwnerReferencesPermissionEnforcement admission plugin
# (OpenShift) require this to set one.
- apiGroups: ["volt.dev"]
  resources: ["agents/finalizers", "workflowruns/finalizers", "workflowschedules/finalizers"]
  verbs: ["update"]
# Container steps run as pods, created and deleted by the operator; agent replicas are pods
# whose status gives their health.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"{{ if gt (int .Values.sharding.shards) 1 }}, "patch"{{ end }}]
# Step outputs over the inline limit, and the persistent tier of the step cache.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch"]
# The API keys of Agents (spec.apiKeySecretRef), read one by one: never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Agents with spec.deployment: their Deployment, applied server-side and owned by the Agent (the
# garbage collector deletes it with the Agent, so no delete here).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch"]
# Kubernetes Events on runs and agents (a repeated event is patched into a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.ui.enabled }}
# The web view shows a step's pod log (to users who may get pods/log themselves).
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
{{- end }}
{{- with .Values.rbac.extraRules }}
# rbac.extraRules: the kinds resource steps may create (get, list, watch, create, delete).
{{ toYaml . }}
{{- end }}
{{- end }}
