{{- define "camelid.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "camelid.operator" -}}
{{- printf "%s-operator" (include "camelid.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "camelid.labels" -}}
app.kubernetes.io/name: camelid
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "camelid.operatorSelector" -}}
app.kubernetes.io/name: camelid
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The Secret holding the install's secret that workers' tokens derive from (the operator and gateway read it). */}}
{{- define "camelid.workerSecret" -}}
{{- printf "%s-worker-secret" (include "camelid.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The env entry that gives a container the install's worker secret. */}}
{{- define "camelid.workerSecretEnv" -}}
- name: CAMELID_WORKER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "camelid.workerSecret" . }}
      key: secret
{{- end -}}
