{{/* Full name: the release name, cut to 26 characters so "<fullname>-<workflow>"
fits KubeRay's RayCronJob limit (36) and the RayJob limit (47). */}}
{{- define "kdflow.fullname" -}}
{{- .Release.Name | trunc 26 | trimSuffix "-" -}}
{{- end -}}

{{- define "kdflow.labels" -}}
app.kubernetes.io/name: kdflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kdflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kdflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* RayJob / RayCronJob name, checked like kd/deploy/names.py (DNS-1035, 47 / 36). */}}
{{- define "kdflow.jobName" -}}
{{- $name := printf "%s-%s" (include "kdflow.fullname" .) .Values.workflow -}}
{{- $limit := ternary 36 47 (and .Values.schedule.enabled (eq .Values.schedule.kind "RayCronJob")) -}}
{{- if gt (len $name) $limit -}}
{{- fail (printf "release name: %s name %q has %d characters; KubeRay allows at most %d" (ternary "RayCronJob" "RayJob" (eq $limit 36)) $name (len $name) $limit) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "release name: %q is not a DNS-1035 label" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "kdflow.configMapName" -}}
{{- default (printf "%s-experiment" (include "kdflow.jobName" .)) .Values.experiment.existingConfigMap -}}
{{- end -}}

{{- define "kdflow.mlflowName" -}}
{{- printf "%s-mlflow" (include "kdflow.fullname" .) -}}
{{- end -}}

{{- define "kdflow.mlflowUri" -}}
{{- default (printf "http://%s:5000" (include "kdflow.mlflowName" .)) .Values.mlflow.trackingUri -}}
{{- end -}}

{{- define "kdflow.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Ray writes session files, logs and caches under /tmp and $HOME: root fs stays writable. */}}
{{- define "kdflow.raySecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
readOnlyRootFilesystem: false
runAsNonRoot: true
{{- end -}}

{{/* One Ray container; mirrors kd/deploy/render.py container(). Args: dict root name cpu memory gpus mount. */}}
{{- define "kdflow.rayContainer" -}}
{{- $v := .root.Values -}}
name: {{ .name }}
image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
env:
  - name: MLFLOW_TRACKING_URI
    value: {{ include "kdflow.mlflowUri" .root | quote }}
  {{- if $v.s3.endpoint }}
  - name: AWS_ENDPOINT_URL_S3
    value: {{ $v.s3.endpoint | quote }}
  {{- end }}
resources:
  {{- range list "requests" "limits" }}
  {{ . }}:
    cpu: {{ $.cpu | quote }}
    memory: {{ $.memory | quote }}
    {{- if $.gpus }}
    nvidia.com/gpu: {{ $.gpus | quote }}
    {{- end }}
  {{- end }}
securityContext:
  {{- include "kdflow.raySecurityContext" . | nindent 2 }}
{{- if $v.s3.existingSecret }}
envFrom:
  - secretRef:
      name: {{ $v.s3.existingSecret }}
{{- end }}
{{- if .mount }}
volumeMounts:
  - name: experiment
    mountPath: /etc/kdflow
    readOnly: true
{{- end }}
{{- end -}}

{{/* RayJob spec; mirrors kd/deploy/render.py rayjob_spec(). */}}
{{- define "kdflow.rayJobSpec" -}}
{{- $v := .Values -}}
entrypoint: {{ printf "kd %s /etc/kdflow/experiment.yaml" $v.workflow }}
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ $v.job.activeDeadlineSeconds }}
preRunningDeadlineSeconds: {{ $v.job.preRunningDeadlineSeconds }}
backoffLimit: {{ $v.job.backoffLimit }}
submitterConfig:
  backoffLimit: {{ $v.job.submitterBackoffLimit }}
rayClusterSpec:
  rayVersion: {{ $v.rayVersion | quote }}
  headGroupSpec:
    rayStartParams:
      num-cpus: "0"
      dashboard-host: "0.0.0.0"
    template:
      metadata:
        labels:
          app.kubernetes.io/name: kdflow
          app.kubernetes.io/component: ray
      spec:
        serviceAccountName: {{ include "kdflow.serviceAccountName" . }}
        automountServiceAccountToken: false
        securityContext:
          {{- include "kdflow.podSecurityContext" . | nindent 10 }}
        containers:
          - {{- include "kdflow.rayContainer" (dict "root" . "name" "ray-head" "cpu" $v.head.cpu "memory" $v.head.memory "gpus" 0 "mount" true) | nindent 12 }}
        volumes:
          - name: experiment
            configMap:
              name: {{ include "kdflow.configMapName" . }}
  workerGroupSpecs:
    - groupName: gpu
      replicas: {{ $v.workers.replicas }}
      minReplicas: {{ $v.workers.replicas }}
      maxReplicas: {{ $v.workers.replicas }}
      rayStartParams: {}
      template:
        metadata:
          labels:
            app.kubernetes.io/name: kdflow
            app.kubernetes.io/component: ray
        spec:
          serviceAccountName: {{ include "kdflow.serviceAccountName" . }}
          automountServiceAccountToken: false
          securityContext:
            {{- include "kdflow.podSecurityContext" . | nindent 12 }}
          tolerations:
            - key: nvidia.com/gpu
              operator: Exists
              effect: NoSchedule
          {{- if $v.gpu.type }}
          nodeSelector:
            nvidia.com/gpu.product: {{ $v.gpu.type | quote }}
          {{- end }}
          containers:
            - {{- include "kdflow.rayContainer" (dict "root" . "name" "ray-worker" "cpu" $v.workers.cpu "memory" $v.workers.memory "gpus" $v.gpu.count "mount" false) | nindent 14 }}
{{- end -}}
